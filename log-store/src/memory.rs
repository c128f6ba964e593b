//! Allocator settings for a program that moves batches: buffers of a few hundred KiB
//! are allocated and freed for every request it sends or serves.

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
