//! Memory as the log sees it: allocator settings for a program that moves batches
//! (buffers of a few hundred KiB are allocated and freed for every request it sends or
//! serves), and how much of a file the page cache holds.

/// Keeps freed memory for reuse instead of handing it back to the kernel. Each request
/// brings fresh buffers of a few hundred KiB (a batch, gRPC's send and receive buffers);
/// by default glibc maps buffers that large anew, or trims the heap as they are freed,
/// so each one faulted its pages in again and had them zeroed. Does nothing where the C
/// library is not glibc. Meant for `main`, before the work starts.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of the allocator's parameters (glibc takes its own
    // lock to do so); nothing is passed by pointer.
    let _ = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20)
    };
}

/// How many of `path`'s pages are in the page cache now, and how many it has: what a
/// cache window (`LogConfig::cache_window_bytes`) leaves cached can be checked with it.
pub fn cached_pages(path: &std::path::Path) -> std::io::Result<(usize, usize)> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok((0, 0));
    }
    #[allow(unsafe_code)]
    // SAFETY: a read-only map, only ever passed to mincore(2), which reads no byte of
    // it: a file changed or cut meanwhile cannot make this read past its end.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    #[allow(unsafe_code)]
    // SAFETY: sysconf(3) takes no pointers.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut resident = vec![0u8; map.len().div_ceil(page.max(1))];
    #[allow(unsafe_code)]
    // SAFETY: mincore(2) looks up the mapping's range, which `map` keeps mapped, and
    // writes one byte per page into `resident`, which holds that many.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            resident.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((
        resident.iter().filter(|&&b| b & 1 == 1).count(),
        resident.len(),
    ))
}
