//! The fuzz crate's allocator refuses (aborts on) an allocation over `MAX_ALLOCATION`, in every
//! build: this is what stands for `-malloc_limit_mb` in campaigns built without a sanitizer.

use std::process::Command;

use metastore_fuzz::MAX_ALLOCATION;

/// Set in the child process: the size it allocates.
const CHILD: &str = "METASTORE_FUZZ_ALLOCATE";

#[test]
fn an_allocation_over_the_limit_aborts_and_one_under_it_does_not() {
    if let Some(size) = std::env::var_os(CHILD) {
        let size: usize = size.to_str().unwrap().parse().unwrap();
        // Reserved, never touched: RSS would not show it.
        let v: Vec<u8> = Vec::with_capacity(size);
        std::hint::black_box(&v);
        println!("allocated {}", v.capacity());
        return;
    }
    let run = |size: usize| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "an_allocation_over_the_limit_aborts_and_one_under_it_does_not",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, size.to_string())
            .output()
            .unwrap()
    };
    let under = run(MAX_ALLOCATION);
    assert!(under.status.success(), "{under:?}");
    assert!(String::from_utf8_lossy(&under.stdout).contains(&format!("allocated {MAX_ALLOCATION}")));

    let over = run(MAX_ALLOCATION + 1);
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(over.status.signal(), Some(libc_sigabrt()), "{over:?}");
    assert!(
        String::from_utf8_lossy(&over.stderr).contains("an allocation over MAX_ALLOCATION"),
        "{over:?}"
    );
}

/// SIGABRT's number on Linux (no libc dependency for one constant).
fn libc_sigabrt() -> i32 {
    6
}
