//! The three assignors, as pure functions of the members' subscriptions, the topics'
//! partition counts and (for sticky) the previous assignment. Deterministic: the same
//! input always gives the same output, whatever the order members arrived in.

use std::collections::{BTreeMap, BTreeSet};

/// A topic and partition.
pub type Tp = (String, u32);

/// Who gets what: member id → partitions.
pub type Assignment = BTreeMap<String, BTreeSet<Tp>>;

/// How a group spreads partitions over its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Per topic, contiguous ranges; the first members get one more when it does not divide.
    Range,
    /// Every partition of every topic in turn, to the next member subscribed to it.
    RoundRobin,
    /// Balanced, keeping as many previous assignments as balance allows.
    Sticky,
}

impl Strategy {
    /// Parses `range`, `roundrobin` or `sticky`.
    pub fn parse(name: &str) -> Option<Strategy> {
        match name {
            "range" => Some(Strategy::Range),
            "roundrobin" => Some(Strategy::RoundRobin),
            "sticky" => Some(Strategy::Sticky),
            _ => None,
        }
    }

    /// The name members ask for.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Range => "range",
            Strategy::RoundRobin => "roundrobin",
            Strategy::Sticky => "sticky",
        }
    }
}

/// Assigns every partition of every subscribed topic (known in `partitions`) to exactly
/// one member subscribed to its topic.
pub fn assign(
    strategy: Strategy,
    subscriptions: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut out: Assignment = subscriptions
        .keys()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    match strategy {
        Strategy::Range => range(subscriptions, partitions, &mut out),
        Strategy::RoundRobin => round_robin(subscriptions, partitions, &mut out),
        Strategy::Sticky => sticky(subscriptions, partitions, previous, &mut out),
    }
    out
}

/// Members subscribed to `topic`, in id order.
fn subscribers<'a>(subs: &'a BTreeMap<String, BTreeSet<String>>, topic: &str) -> Vec<&'a String> {
    subs.iter()
        .filter(|(_, topics)| topics.contains(topic))
        .map(|(m, _)| m)
        .collect()
}

fn range(
    subs: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    out: &mut Assignment,
) {
    for (topic, &count) in partitions {
        let members = subscribers(subs, topic);
        if members.is_empty() {
            continue;
        }
        let n = members.len() as u32;
        let (each, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, m) in members.into_iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            let set = out.entry(m.clone()).or_default();
            for p in next..next + take {
                set.insert((topic.clone(), p));
            }
            next += take;
        }
    }
}

fn round_robin(
    subs: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    out: &mut Assignment,
) {
    let members: Vec<&String> = subs.keys().collect();
    if members.is_empty() {
        return;
    }
    let mut cursor = 0;
    for (topic, &count) in partitions {
        for p in 0..count {
            // The next member in the circle that subscribes to this topic.
            for step in 0..members.len() {
                let m = members[(cursor + step) % members.len()];
                if subs[m].contains(topic) {
                    out.entry(m.clone()).or_default().insert((topic.clone(), p));
                    cursor = (cursor + step + 1) % members.len();
                    break;
                }
            }
        }
    }
}

fn sticky(
    subs: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
    out: &mut Assignment,
) {
    let valid = |m: &str, tp: &Tp| {
        subs.get(m).is_some_and(|t| t.contains(&tp.0))
            && partitions.get(&tp.0).is_some_and(|&n| tp.1 < n)
    };
    let all: BTreeSet<Tp> = partitions
        .iter()
        .filter(|(t, _)| subs.values().any(|s| s.contains(*t)))
        .flat_map(|(t, &n)| (0..n).map(move |p| (t.clone(), p)))
        .collect();
    // Each member's fair share when everyone subscribes to everything; with mixed
    // subscriptions the balancing below still only moves what a taker may hold.
    let members = subs.len().max(1);
    let ceiling = all.len().div_ceil(members);
    let mut taken: BTreeSet<Tp> = BTreeSet::new();
    // 1. Keep what each member had, up to its fair share.
    for (m, had) in previous {
        if !subs.contains_key(m) {
            continue;
        }
        let set = out.entry(m.clone()).or_default();
        for tp in had {
            if set.len() < ceiling && valid(m, tp) && !taken.contains(tp) {
                taken.insert(tp.clone());
                set.insert(tp.clone());
            }
        }
    }
    // 2. Everything else to the least-loaded member that may take it.
    for tp in all.iter().filter(|tp| !taken.contains(*tp)) {
        let target = out
            .iter()
            .filter(|(m, _)| valid(m, tp))
            .min_by_key(|(m, set)| (set.len(), (*m).clone()))
            .map(|(m, _)| m.clone());
        if let Some(m) = target {
            out.entry(m).or_default().insert(tp.clone());
        }
    }
    // 3. Even out: move one partition at a time from the fullest member to the emptiest
    // that may take it, while they differ by more than one.
    loop {
        let mut moved = false;
        let order: Vec<String> = {
            let mut v: Vec<(usize, String)> =
                out.iter().map(|(m, s)| (s.len(), m.clone())).collect();
            v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            v.into_iter().map(|(_, m)| m).collect()
        };
        'search: for giver in &order {
            for taker in order.iter().rev() {
                if out[giver].len() <= out[taker].len() + 1 {
                    continue;
                }
                let candidate = out[giver].iter().find(|tp| valid(taker, tp)).cloned();
                if let Some(tp) = candidate {
                    out.entry(giver.clone()).or_default().remove(&tp);
                    out.entry(taker.clone()).or_default().insert(tp);
                    moved = true;
                    break 'search;
                }
            }
        }
        if !moved {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{
        any, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, TestCaseError,
    };
    use proptest::strategy::Strategy as Gen;

    fn subs(members: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        members
            .iter()
            .map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    fn parts(topics: &[(&str, u32)]) -> BTreeMap<String, u32> {
        topics.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    fn names(a: &Assignment, m: &str) -> Vec<String> {
        a[m].iter().map(|(t, p)| format!("{t}-{p}")).collect()
    }

    #[test]
    fn range_gives_contiguous_ranges_first_members_get_the_extra() {
        let s = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let a = assign(Strategy::Range, &s, &parts(&[("t", 7)]), &Assignment::new());
        assert_eq!(names(&a, "a"), ["t-0", "t-1", "t-2"]);
        assert_eq!(names(&a, "b"), ["t-3", "t-4"]);
        assert_eq!(names(&a, "c"), ["t-5", "t-6"]);
    }

    #[test]
    fn round_robin_deals_partitions_in_turn() {
        let s = subs(&[("a", &["t", "u"]), ("b", &["t", "u"])]);
        let a = assign(
            Strategy::RoundRobin,
            &s,
            &parts(&[("t", 3), ("u", 2)]),
            &Assignment::new(),
        );
        assert_eq!(names(&a, "a"), ["t-0", "t-2", "u-1"]);
        assert_eq!(names(&a, "b"), ["t-1", "u-0"]);
    }

    #[test]
    fn sticky_keeps_the_survivors_partitions_when_a_member_leaves() {
        let p = parts(&[("t", 6)]);
        let three = subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let before = assign(Strategy::Sticky, &three, &p, &Assignment::new());
        let two = subs(&[("a", &["t"]), ("c", &["t"])]);
        let after = assign(Strategy::Sticky, &two, &p, &before);
        for m in ["a", "c"] {
            assert!(before[m].is_subset(&after[m]), "{m} lost a partition");
            assert_eq!(after[m].len(), 3);
        }
    }

    #[test]
    fn unknown_topics_and_unsubscribed_topics_are_left_out() {
        let s = subs(&[("a", &["t", "missing"])]);
        for strategy in [Strategy::Range, Strategy::RoundRobin, Strategy::Sticky] {
            let a = assign(
                strategy,
                &s,
                &parts(&[("t", 2), ("other", 4)]),
                &Assignment::new(),
            );
            assert_eq!(names(&a, "a"), ["t-0", "t-1"], "{strategy:?}");
        }
    }

    fn strategy() -> impl Gen<Value = super::Strategy> {
        prop_oneof![
            Just(super::Strategy::Range),
            Just(super::Strategy::RoundRobin),
            Just(super::Strategy::Sticky),
        ]
    }

    fn check_complete(
        s: &BTreeMap<String, BTreeSet<String>>,
        p: &BTreeMap<String, u32>,
        a: &Assignment,
    ) -> Result<(), TestCaseError> {
        let mut seen = BTreeSet::new();
        for (m, set) in a {
            for tp in set {
                prop_assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
                prop_assert!(s[m].contains(&tp.0), "{m} got {tp:?} without subscribing");
            }
        }
        for (t, &n) in p {
            if s.values().any(|ts| ts.contains(t)) {
                for i in 0..n {
                    prop_assert!(seen.contains(&(t.clone(), i)), "{t}-{i} unassigned");
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn every_partition_once_balanced_and_deterministic(
            strategy in strategy(),
            members in 1usize..8,
            counts in proptest::collection::vec(1u32..12, 1..4),
            mixed in any::<bool>(),
        ) {
            let topics: Vec<String> = (0..counts.len()).map(|i| format!("t{i}")).collect();
            let p: BTreeMap<String, u32> =
                topics.iter().cloned().zip(counts.iter().copied()).collect();
            let s: BTreeMap<String, BTreeSet<String>> = (0..members)
                .map(|i| {
                    let ts = topics
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| !mixed || (i + j) % 2 == 0 || topics.len() == 1)
                        .map(|(_, t)| t.clone())
                        .collect();
                    (format!("m{i}"), ts)
                })
                .collect();
            let a = assign(strategy, &s, &p, &Assignment::new());
            check_complete(&s, &p, &a)?;
            prop_assert_eq!(&a, &assign(strategy, &s, &p, &Assignment::new()));
            if !mixed && strategy != super::Strategy::Range {
                let sizes: Vec<usize> = a.values().map(BTreeSet::len).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                prop_assert!(max.zip(min).is_none_or(|(x, n)| x - n <= 1), "unbalanced {sizes:?}");
            }
            if !mixed && strategy == super::Strategy::Range {
                // Range balances per topic, not overall.
                for t in &topics {
                    let per: Vec<usize> =
                        a.values().map(|set| set.iter().filter(|tp| &tp.0 == t).count()).collect();
                    let (min, max) = (per.iter().min(), per.iter().max());
                    prop_assert!(max.zip(min).is_none_or(|(x, n)| x - n <= 1));
                }
            }
        }

        #[test]
        fn sticky_moves_only_what_balance_needs(
            members in 2usize..8,
            count in 1u32..40,
            leaver in 0usize..8,
            joiners in 0usize..3,
        ) {
            let p: BTreeMap<String, u32> = [("t".to_string(), count)].into();
            let all = |ids: &[String]| -> BTreeMap<String, BTreeSet<String>> {
                ids.iter().map(|m| (m.clone(), ["t".to_string()].into())).collect()
            };
            let ids: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
            let before = assign(super::Strategy::Sticky, &all(&ids), &p, &Assignment::new());
            let gone = &ids[leaver % members];
            let mut next: Vec<String> = ids.iter().filter(|m| *m != gone).cloned().collect();
            next.extend((0..joiners).map(|j| format!("new{j}")));
            let after = assign(super::Strategy::Sticky, &all(&next), &p, &before);
            check_complete(&all(&next), &p, &after)?;
            let sizes: Vec<usize> = after.values().map(BTreeSet::len).collect();
            prop_assert!(sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1);
            // A survivor never swaps partitions: it keeps all it had, or as many as it
            // still holds when balance made it give some up.
            for m in ids.iter().filter(|m| *m != gone) {
                let kept = before[m].intersection(&after[m]).count();
                prop_assert!(
                    kept >= before[m].len().min(after[m].len()),
                    "{m} kept {kept} of {}, holds {}", before[m].len(), after[m].len()
                );
            }
        }
    }
}
