//! The SQLite write thread ends once its store is gone (its own test binary, so that no other
//! test's store has a write thread in this process).

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use driftsync_engine::store::{Append, SqliteStore, Store};

/// Threads of this process named like the write thread (`/proc` shows 15 bytes of the name).
fn write_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "driftsync-sqlit")
        .count()
}

#[tokio::test]
async fn the_write_thread_ends_with_its_store_busy_or_parked() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(write_threads(), 0);
    // Dropped while the thread waits for its next job, and again once it has parked for good
    // after giving its cache back.
    for pause in [Duration::ZERO, Duration::from_millis(2_500)] {
        let store = SqliteStore::open(dir.path().join("store.db")).await.unwrap();
        let append = Append {
            doc: "d".into(),
            update: b"x".to_vec(),
            origin: None,
            chat: None,
        };
        store.append(&[append]).await.unwrap();
        assert_eq!(write_threads(), 1);
        tokio::time::sleep(pause).await;
        let clone = store.clone();
        drop(store);
        assert_eq!(write_threads(), 1, "a clone keeps the thread");
        drop(clone);
        let start = Instant::now();
        while write_threads() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the write thread outlived its store"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
