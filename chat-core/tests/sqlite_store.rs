//! The history-store conformance suites against SQLite (cargo feature `sqlite`), each store in a
//! fresh file of its own; plus what only a file can get wrong: damaged or foreign files.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chat_core::store::{HistoryStore, SqliteHistoryStore, StoreConfig};

/// A fresh path in a temporary directory of this process.
fn fresh_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("chat-sqlite-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}.db", NEXT.fetch_add(1, Ordering::Relaxed)))
}

async fn open(path: PathBuf, config: StoreConfig) -> Arc<dyn HistoryStore> {
    Arc::new(SqliteHistoryStore::open(path, config).await.unwrap())
}

chat_core::store_conformance_tests!(|config| open(fresh_path(), config));

chat_core::durable_store_conformance_tests!(|| async { fresh_path() }, open);

async fn open_error(path: &std::path::Path) -> String {
    match SqliteHistoryStore::open(path, StoreConfig::default()).await {
        Ok(_) => panic!("{} was opened", path.display()),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_a_clear_error_at_open() {
    let path = fresh_path();
    std::fs::write(&path, vec![0xAB; 8_192]).unwrap();
    let error = open_error(&path).await;
    assert!(error.contains("not a SQLite database"), "{error}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        vec![0xAB; 8_192],
        "it was written to"
    );
}

#[tokio::test]
async fn a_database_of_something_else_is_refused_untouched() {
    let path = fresh_path();
    {
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let error = open_error(&path).await;
    assert!(error.contains("something else"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "it was written to");
}

/// The body of the unwritable-file check, run by [`an_unwritable_file_is_a_clear_error_at_open`]
/// as a user the file's permissions apply to.
#[tokio::test]
#[ignore = "run by an_unwritable_file_is_a_clear_error_at_open"]
async fn unwritable_file_check() {
    let path = PathBuf::from(std::env::var("CHAT_UNWRITABLE_DB").unwrap());
    let error = open_error(&path).await;
    assert!(error.contains("cannot write"), "{error}");
    assert!(
        !error.contains("lock file"),
        "refused for its lock file: {error}"
    );
}

#[tokio::test]
async fn an_unwritable_file_is_a_clear_error_at_open() {
    use std::os::unix::fs::PermissionsExt;
    let path = fresh_path();
    drop(
        SqliteHistoryStore::open(&path, StoreConfig::default())
            .await
            .unwrap(),
    );
    // The writer thread holds the lock until it has closed the file.
    let mut lock = path.as_os_str().to_owned();
    lock.push("-lock");
    let lock = PathBuf::from(lock);
    std::fs::File::open(&lock).unwrap().lock().unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Only the database is unwritable: the check is about it, not its lock file.
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let privileged = std::fs::OpenOptions::new().append(true).open(&path).is_ok();
    if !privileged {
        std::env::set_var("CHAT_UNWRITABLE_DB", &path);
        let error = open_error(&path).await;
        assert!(error.contains("cannot write"), "{error}");
        assert!(
            !error.contains("lock file"),
            "refused for its lock file: {error}"
        );
        return;
    }
    // Permissions do not bind this (root) user: run the check as `nobody`, whom they bind.
    let dir = path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unwritable_file_check",
            "--ignored",
            "--nocapture",
        ])
        .env("CHAT_UNWRITABLE_DB", &path)
        .status()
        .expect("setpriv (util-linux) is needed to run this check as an unprivileged user");
    assert!(status.success(), "the check failed as an unprivileged user");
}

#[tokio::test]
async fn a_second_process_on_the_same_file_is_a_clear_error() {
    let path = fresh_path();
    let first = SqliteHistoryStore::open(&path, StoreConfig::default())
        .await
        .unwrap();
    // The lock is per open file, so a second open in this process stands in for another process.
    let error = open_error(&path).await;
    assert!(error.contains("in use by another process"), "{error}");
    drop(first);
}

/// Fills a store's file with a few thousand messages and closes it: the store's writer has
/// finished (its lock is free) and every page is in the main file (the WAL is empty).
async fn a_closed_store_with_history(path: &std::path::Path) {
    let store = SqliteHistoryStore::open(path, StoreConfig::default())
        .await
        .unwrap();
    let room = chat_core::store::Conversation::room("lobby");
    let body = "a message long enough to fill pages quickly ".repeat(4);
    for i in 0..3_000u64 {
        let message = chat_core::store::NewMessage {
            from: "alice",
            to: None,
            body: &body,
            ts: 1_000 + i,
            reference: None,
        };
        store.append(&room, message).await.unwrap();
    }
    drop(store);
    let mut lock = path.as_os_str().to_owned();
    lock.push("-lock");
    std::fs::File::open(lock).unwrap().lock().unwrap();
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
}

#[tokio::test]
async fn a_damaged_store_file_is_a_clear_error_at_open() {
    let path = fresh_path();
    a_closed_store_with_history(&path).await;
    // Reopening the intact file works, and reading it is what damage would break.
    let intact = SqliteHistoryStore::open(&path, StoreConfig::default())
        .await
        .unwrap();
    drop(intact);
    let mut lock = path.as_os_str().to_owned();
    lock.push("-lock");
    std::fs::File::open(lock).unwrap().lock().unwrap();

    // Scribble over the middle fifth of the file, as a bad disk or a stray write would.
    let mut bytes = std::fs::read(&path).unwrap();
    let (from, to) = (bytes.len() * 2 / 5, bytes.len() * 3 / 5);
    bytes[from..to].fill(0x5A);
    std::fs::write(&path, &bytes).unwrap();

    let error = open_error(&path).await;
    assert!(error.contains("is damaged"), "{error}");
    assert!(error.contains("backup"), "no advice on what to do: {error}");
}
