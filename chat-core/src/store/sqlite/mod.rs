//! [`SqliteHistoryStore`]: history in one SQLite file, embedded (cargo feature `sqlite`).
//!
//! The example servers' default store: nothing to install, and a newcomer's history survives a
//! restart.
//!
//! # Writes: one thread, group commit
//!
//! SQLite allows one writer at a time, so one thread owns the only writing connection. Appends
//! and read positions queue up for it; it takes everything that queued while its previous commit
//! ran (up to a thousand) and commits it as one transaction, so a burst of sends costs one
//! `fsync`, not one each. The database is in WAL mode with `synchronous = FULL`: a commit is on
//! disk before it returns, and only then does any request of the batch get its answer, so an
//! `ack` always names a durable message. A batch is atomic: if anything in it fails, every
//! request gets an error and nothing of it is stored.
//!
//! One writer also makes the id contract simple: appends are numbered in commit order, every
//! id below a visible one is visible. And it lets the writer keep the retry window's refs in
//! memory (loaded from the `ref_log` table at open, which it only ever appends to), so recognising
//! a retry costs no random page writes; that is most of what group commit saves. One file, one
//! process: a lock file makes a second process opening it fail with a clear error.
//!
//! WAL checkpoints run on a thread of their own, every second, never inside a commit.
//!
//! # Reads
//!
//! A few read-only connections, each used by one blocking task at a time; WAL lets them read
//! while the writer writes. A page and the conversation's newest id are read in one snapshot.
//! Retention (by count and by age) is exact at read time; the writer trims what falls out by
//! count in the same transaction as the append, and every ten seconds forgets expired refs and
//! messages past the age limit, a small chunk after each batch until it has caught up, so
//! deletion keeps pace with any rate of appends without holding writes up.
//!
//! # Files
//!
//! The file carries an application id and a schema version. A new or empty file gets the schema;
//! a file of another application, or one that is not SQLite at all, is refused with a clear
//! error at open, before anything is written; so is a file that cannot be written, and one whose
//! pages are damaged (the whole file is read once at open to find out).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{
    now_ms, Appended, Conversation, HistoryStore, InboxEntry, NewMessage, Page, StoreConfig,
    StoreError, StoredMessage,
};

/// "chat", in the file's header: tells this store's files from other SQLite databases.
const APPLICATION_ID: i64 = 0x6368_6174;
const SCHEMA_VERSION: i64 = 1;
/// Most requests one commit takes.
const MAX_BATCH: usize = 1_000;
/// Requests that may wait for the writer; more wait to be queued.
const QUEUE: usize = 10_000;
const READERS: usize = 4;
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);
/// Most old rows one maintenance round deletes per table, so it never holds the writer long.
/// Rows one maintenance step deletes at most: a few milliseconds of the writer's time.
const MAINTENANCE_CHUNK: i64 = 2_000;
/// Most refs kept in memory; past it the oldest are forgotten before their window ends (only
/// reached above several thousand messages a second for the whole ten-minute window).
const REF_CAPACITY: usize = 2_000_000;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long opening waits for the lock of a store of this process that is still closing.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// A [`HistoryStore`] in a SQLite file. Cheap to clone; clones share the file's connections.
///
/// ```no_run
/// use chat_core::store::{SqliteHistoryStore, StoreConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::store::StoreError> {
/// let store = SqliteHistoryStore::open("chat.db", StoreConfig::default()).await?;
/// # drop(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteHistoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    config: StoreConfig,
    epoch: String,
    writes: mpsc::Sender<Write>,
    readers: Mutex<Vec<Connection>>,
    permits: Semaphore,
    /// Dropped with the store: stops the checkpoint thread.
    _checkpoints: std::sync::mpsc::Sender<()>,
}

/// What a retry is recognised by.
type RefKey = (String, String, String);

/// The refs of the retry window, owned by the writer thread (the only one that writes), backed
/// by `ref_log`.
struct Refs {
    window: i64,
    known: HashMap<RefKey, (i64, i64)>,
    /// Keys in the order they were stored, with their ts, for forgetting the oldest.
    order: VecDeque<(i64, RefKey)>,
}

impl Refs {
    fn load(conn: &Connection, window: i64) -> rusqlite::Result<Self> {
        let mut refs = Self {
            window,
            known: HashMap::new(),
            order: VecDeque::new(),
        };
        // Everything the log still holds: the window is measured on the messages' ts, and
        // maintenance keeps the log to about the window.
        let mut statement =
            conn.prepare("SELECT conversation, sender, ref, id, ts FROM ref_log ORDER BY seq")?;
        let rows = statement.query_map([], |row| {
            Ok((
                (row.get(0)?, row.get(1)?, row.get(2)?),
                row.get(3)?,
                row.get(4)?,
            ))
        })?;
        for row in rows {
            let (key, id, ts) = row?;
            refs.remember(key, id, ts);
        }
        Ok(refs)
    }

    fn get(&self, key: &RefKey) -> Option<(i64, i64)> {
        self.known.get(key).copied()
    }

    fn remember(&mut self, key: RefKey, id: i64, ts: i64) {
        self.known.insert(key.clone(), (id, ts));
        self.order.push_back((ts, key));
        while self.order.len() > REF_CAPACITY {
            self.forget_front();
        }
    }

    /// Forgets the refs whose window has ended.
    fn forget_old(&mut self) {
        let oldest = signed(now_ms()).saturating_sub(self.window);
        while self.order.front().is_some_and(|(ts, _)| *ts < oldest) {
            self.forget_front();
        }
    }

    fn forget_front(&mut self) {
        if let Some((ts, key)) = self.order.pop_front() {
            // Only the entry this slot was made for, not a newer one under the same key.
            if self.known.get(&key).is_some_and(|(_, at)| *at == ts) {
                self.known.remove(&key);
            }
        }
    }
}

/// A request for the writer thread.
enum Write {
    Append {
        conversation: String,
        direct: bool,
        message: Owned,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    MarkRead {
        reader: String,
        conversation: String,
        id: i64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// A [`NewMessage`] the writer thread can own.
struct Owned {
    from: String,
    to: Option<String>,
    body: String,
    ts: i64,
    reference: Option<String>,
}

fn failed(error: rusqlite::Error) -> StoreError {
    StoreError(format!("sqlite: {error}"))
}

fn key(conversation: &Conversation) -> String {
    match conversation {
        Conversation::Room(room) => format!("r:{room}"),
        Conversation::Direct(a, b) => format!("d:{a}:{b}"),
    }
}

/// SQLite integers are signed: anything larger saturates.
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Says what is wrong with the file, from SQLite's error code, for a person starting a server.
fn file_problem(path: &Path, error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let shown = path.display();
    let kind = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => Some(failure.code),
        _ => None,
    };
    StoreError(match kind {
        Some(ErrorCode::NotADatabase) => {
            format!("{shown} is not a SQLite database: {error}")
        }
        Some(ErrorCode::DatabaseCorrupt) => format!(
            "{shown} is damaged ({error}): restore it from a backup, or move it away to start empty"
        ),
        Some(
            ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure,
        ) => format!("cannot write to {shown}: {error}"),
        _ => format!("cannot use {shown}: {error}"),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the writing connection, checks the file is ours (or new), brings its schema up to date
/// and returns it with the store's epoch.
fn open_writer(path: &Path) -> Result<(Connection, String), StoreError> {
    let shown = path.display();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|error| StoreError(format!("cannot open {shown}: {error}")))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(failed)?;
    let problem = |error| file_problem(path, error);
    let application: i64 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(problem)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(problem)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
        .map_err(problem)?;
    let fresh = application == 0 && version == 0 && tables == 0;
    if application != APPLICATION_ID && !fresh {
        return Err(StoreError(format!(
            "{shown} is a SQLite database of something else (application id {application:#x}, \
             {tables} schema objects): refusing to touch it"
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "{shown} has schema version {version}, newer than this program's {SCHEMA_VERSION}"
        )));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(problem)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError(format!(
            "cannot use write-ahead logging for {shown} (journal mode stays {mode})"
        )));
    }
    // Checkpoints run on their own thread, never inside a commit; a bigger page cache for the
    // one connection that writes.
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -16384;",
    )
    .map_err(failed)?;
    let unwritable = problem;
    if fresh {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unwritable)?;
        tx.execute_batch(include_str!("schema.sql"))
            .map_err(unwritable)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1)",
            [crate::layer::unique_channel_name("sqlite")],
        )
        .map_err(unwritable)?;
        tx.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))
        .map_err(unwritable)?;
        tx.commit().map_err(unwritable)?;
    } else {
        check_integrity(&conn, path)?;
        // Prove now, not at the first send, that the file takes writes.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(unwritable)?;
    }
    let epoch = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| {
            row.get(0)
        })
        .map_err(|error| StoreError(format!("{shown}: no epoch: {error}")))?;
    Ok((conn, epoch))
}

/// Reads the whole file once (`PRAGMA quick_check`: every page and index entry, not their
/// cross-checks), so that damage shows at start rather than as failed sends later. It costs one
/// to two seconds per gigabyte of file at start (0.45 s for 280 MB here).
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut statement = conn
        .prepare("PRAGMA quick_check(5)")
        .map_err(|error| file_problem(path, error))?;
    let findings = statement
        .query_map([], |row| row.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|error| file_problem(path, error))?;
    if findings.len() == 1 && findings[0] == "ok" {
        return Ok(());
    }
    Err(StoreError(format!(
        "{} is damaged ({}): restore it from a backup, or move it away to start empty",
        path.display(),
        findings
            .iter()
            .flat_map(|finding| finding.lines())
            .filter(|line| !line.starts_with("***"))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// Takes `{path}-lock` for this process, so a second process cannot open the store (its writer
/// keeps the retry window in memory, which only holds with one writer). The writer thread holds
/// it until its last commit, so a store reopened right after it was dropped waits for that
/// (up to [`LOCK_WAIT`]) instead of racing it.
async fn lock_file(path: &Path) -> Result<File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push("-lock");
    let shown = path.display();
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .map_err(|error| {
            StoreError(format!(
                "cannot write to {shown}: its lock file {}: {error}",
                Path::new(&name).display()
            ))
        })?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError(format!(
                    "{shown} is in use by another process (a SQLite store serves one server)"
                )))
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(StoreError(format!("cannot lock {shown}: {error}")))
            }
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|error| StoreError(format!("cannot open {}: {error}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(failed)?;
    Ok(conn)
}

/// The writer thread: commits what has queued, as one transaction, until the store is dropped.
fn write_loop(
    mut conn: Connection,
    mut writes: mpsc::Receiver<Write>,
    config: StoreConfig,
    mut refs: Refs,
) {
    let mut maintenance = Maintenance::new();
    while let Some(first) = writes.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match writes.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        commit(&mut conn, batch, &config, &mut refs);
        maintenance.after_batch(&conn, &config, &mut refs);
    }
}

/// When the writer forgets expired refs and messages past the maximum age: every
/// [`MAINTENANCE_EVERY`], one chunk after each batch until it has caught up. Writes go on between
/// chunks, and however fast they come, deletion keeps pace (a chunk per batch).
struct Maintenance {
    due: Instant,
    behind: bool,
}

impl Maintenance {
    fn new() -> Self {
        Self {
            due: Instant::now() + MAINTENANCE_EVERY,
            behind: false,
        }
    }

    fn after_batch(&mut self, conn: &Connection, config: &StoreConfig, refs: &mut Refs) {
        if !self.behind && Instant::now() >= self.due {
            refs.forget_old();
            self.behind = true;
            self.due = Instant::now() + MAINTENANCE_EVERY;
        }
        if self.behind {
            match maintain(conn, config, refs.window) {
                Ok(deleted) => self.behind = deleted >= MAINTENANCE_CHUNK as usize,
                Err(error) => {
                    tracing::warn!(%error, "sqlite maintenance failed");
                    self.behind = false;
                }
            }
        }
    }
}

/// Runs WAL checkpoints every second until the store is dropped.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Err(error) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(%error, "sqlite checkpoint failed");
        }
    }
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

/// What one request of a batch came to.
enum Outcome {
    Appended(Appended),
    Read(u64),
}

fn commit(conn: &mut Connection, batch: Vec<Write>, config: &StoreConfig, refs: &mut Refs) {
    let mut fresh = HashMap::new();
    let outcomes = apply_all(conn, &batch, config, refs, &mut fresh);
    if outcomes.is_ok() {
        // Committed: this batch's refs are part of the window now.
        for (key, (id, ts)) in fresh {
            refs.remember(key, id, ts);
        }
    }
    let outcomes: Vec<Result<Outcome, StoreError>> = match outcomes {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
    };
    for (write, outcome) in batch.into_iter().zip(outcomes) {
        let wrong = || StoreError("internal: a reply of the wrong kind".into());
        match write {
            Write::Append { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Appended(appended) => Ok(appended),
                    Outcome::Read(_) => Err(wrong()),
                }));
            }
            Write::MarkRead { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Read(position) => Ok(position),
                    Outcome::Appended(_) => Err(wrong()),
                }));
            }
        }
    }
}

/// Applies a batch in one transaction; any failure fails it all. `fresh` collects the refs the
/// batch stores, so that a retry inside the same batch is recognised too.
fn apply_all(
    conn: &mut Connection,
    batch: &[Write],
    config: &StoreConfig,
    refs: &Refs,
    fresh: &mut HashMap<RefKey, (i64, i64)>,
) -> Result<Vec<Outcome>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut touched: HashMap<&str, i64> = HashMap::new();
    for write in batch {
        let outcome = match write {
            Write::Append {
                conversation,
                direct,
                message,
                ..
            } => {
                let appended =
                    append(&tx, conversation, *direct, message, refs, fresh).map_err(failed)?;
                if !appended.duplicate {
                    touched.insert(conversation, signed(appended.message.id));
                }
                Outcome::Appended(appended)
            }
            Write::MarkRead {
                reader,
                conversation,
                id,
                ..
            } => Outcome::Read(mark_read(&tx, reader, conversation, *id).map_err(failed)?),
        };
        outcomes.push(outcome);
    }
    let retention = signed(config.retention as u64);
    for (conversation, last_id) in touched {
        if last_id > retention {
            tx.execute(
                "DELETE FROM messages WHERE conversation = ?1 AND id <= ?2",
                params![conversation, last_id - retention],
            )
            .map_err(failed)?;
        }
    }
    tx.commit().map_err(failed)?;
    Ok(outcomes)
}

fn append(
    tx: &Connection,
    conversation: &str,
    direct: bool,
    message: &Owned,
    refs: &Refs,
    fresh: &mut HashMap<RefKey, (i64, i64)>,
) -> rusqlite::Result<Appended> {
    let key = message.reference.as_ref().map(|reference| {
        (
            conversation.to_owned(),
            message.from.clone(),
            reference.clone(),
        )
    });
    if let Some(key) = &key {
        let earlier = fresh.get(key).copied().or_else(|| refs.get(key));
        if let Some((id, ts)) = earlier {
            if ts.saturating_add(refs.window) > message.ts {
                let original = tx
                    .prepare_cached(
                        "SELECT sender, recipient, body, ts FROM messages \
                         WHERE conversation = ?1 AND id = ?2",
                    )?
                    .query_row(params![conversation, id], |row| {
                        Ok(StoredMessage {
                            id: unsigned(id),
                            from: row.get(0)?,
                            to: row.get(1)?,
                            body: row.get(2)?,
                            ts: unsigned(row.get(3)?),
                        })
                    })
                    .optional()?;
                // Retention may have dropped the original; the retry carries the same content.
                let message = original.unwrap_or_else(|| StoredMessage {
                    id: unsigned(id),
                    from: message.from.clone(),
                    to: message.to.clone(),
                    body: message.body.clone(),
                    ts: unsigned(ts),
                });
                return Ok(Appended {
                    message,
                    duplicate: true,
                });
            }
        }
    }
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO conversations (key, last_id) VALUES (?1, 1) \
             ON CONFLICT (key) DO UPDATE SET last_id = last_id + 1 RETURNING last_id",
        )?
        .query_row([conversation], |row| row.get(0))?;
    tx.prepare_cached(
        "INSERT INTO messages (conversation, id, sender, recipient, body, ts) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        conversation,
        id,
        message.from,
        message.to,
        message.body,
        message.ts
    ])?;
    if let Some(key) = key {
        tx.prepare_cached(
            "INSERT INTO ref_log (conversation, sender, ref, id, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![key.0, key.1, key.2, id, message.ts])?;
        fresh.insert(key, (id, message.ts));
    }
    if let (true, Some(to)) = (direct, &message.to) {
        let recency: i64 = tx
            .prepare_cached(
                "UPDATE counters SET value = value + 1 WHERE name = 'appends' RETURNING value",
            )?
            .query_row([], |row| row.get(0))?;
        let mut partner = tx.prepare_cached(
            "INSERT INTO partners (owner, partner, conversation, recency) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (owner, partner) DO UPDATE SET recency = excluded.recency",
        )?;
        partner.execute(params![message.from, to, conversation, recency])?;
        partner.execute(params![to, message.from, conversation, recency])?;
    }
    Ok(Appended {
        message: StoredMessage {
            id: unsigned(id),
            from: message.from.clone(),
            to: message.to.clone(),
            body: message.body.clone(),
            ts: unsigned(message.ts),
        },
        duplicate: false,
    })
}

fn mark_read(tx: &Connection, reader: &str, conversation: &str, id: i64) -> rusqlite::Result<u64> {
    let position: i64 = tx
        .prepare_cached(
            "INSERT INTO reads (reader, conversation, id) VALUES (?1, ?2, ?3) \
             ON CONFLICT (reader, conversation) DO UPDATE SET id = max(id, excluded.id) \
             RETURNING id",
        )?
        .query_row(params![reader, conversation, id], |row| row.get(0))?;
    Ok(unsigned(position))
}

/// Forgets refs whose window has ended and messages older than the maximum age, one chunk of
/// each, so the writer is never held long; says how many rows the larger of the two deleted.
fn maintain(conn: &Connection, config: &StoreConfig, window: i64) -> rusqlite::Result<usize> {
    // The log is in time order: look only at its front.
    let refs = conn.execute(
        "DELETE FROM ref_log WHERE seq IN (SELECT seq FROM ref_log ORDER BY seq LIMIT ?2) \
         AND ts < ?1",
        params![signed(now_ms()).saturating_sub(window), MAINTENANCE_CHUNK],
    )?;
    let messages = match config.max_age {
        Some(_) => conn.execute(
            "DELETE FROM messages WHERE (conversation, id) IN \
             (SELECT conversation, id FROM messages WHERE ts < ?1 LIMIT ?2)",
            params![signed(config.oldest_kept_ts()), MAINTENANCE_CHUNK],
        )?,
        None => 0,
    };
    Ok(refs.max(messages))
}

fn stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: unsigned(row.get(0)?),
        from: row.get(1)?,
        to: row.get(2)?,
        body: row.get(3)?,
        ts: unsigned(row.get(4)?),
    })
}

/// Reads a page in one snapshot with the conversation's newest id; retention applies.
fn page(
    conn: &Connection,
    conversation: &str,
    before: Option<i64>,
    after: Option<i64>,
    limit: usize,
    retention: i64,
    oldest_ts: i64,
) -> rusqlite::Result<Page> {
    let tx = conn.unchecked_transaction()?;
    let last_id: i64 = tx
        .prepare_cached("SELECT last_id FROM conversations WHERE key = ?1")?
        .query_row([conversation], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    let floor = last_id.saturating_sub(retention);
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
    let mut messages = match after {
        Some(after) => tx
            .prepare_cached(
                "SELECT id, sender, recipient, body, ts FROM messages \
                 WHERE conversation = ?1 AND id > ?2 AND ts >= ?3 ORDER BY id LIMIT ?4",
            )?
            .query_map(
                params![conversation, after.max(floor), oldest_ts, fetch],
                stored,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => tx
            .prepare_cached(
                "SELECT id, sender, recipient, body, ts FROM messages \
                 WHERE conversation = ?1 AND id < ?2 AND id > ?3 AND ts >= ?4 \
                 ORDER BY id DESC LIMIT ?5",
            )?
            .query_map(
                params![
                    conversation,
                    before.unwrap_or(i64::MAX),
                    floor,
                    oldest_ts,
                    fetch
                ],
                stored,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    let more = messages.len() > limit;
    messages.truncate(limit);
    if after.is_none() {
        messages.reverse();
    }
    tx.finish()?;
    Ok(Page {
        messages,
        more,
        last_id: unsigned(last_id),
    })
}

impl SqliteHistoryStore {
    /// Opens (or creates) the store in the file at `path`; refuses, with a clear error, a file
    /// that is not SQLite, is damaged, belongs to something else, or cannot be written.
    pub async fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let lock = lock_file(&path).await?;
        let window = signed(u64::try_from(config.dedup_window.as_millis()).unwrap_or(u64::MAX));
        let opening = path.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let (writer, epoch) = open_writer(&opening)?;
            let refs =
                Refs::load(&writer, window).map_err(|error| file_problem(&opening, error))?;
            let readers = (0..READERS)
                .map(|_| open_reader(&opening))
                .collect::<Result<Vec<_>, _>>()?;
            let checkpointer = Connection::open(&opening).map_err(failed)?;
            Ok::<_, StoreError>((writer, epoch, refs, readers, checkpointer))
        })
        .await
        .map_err(|error| StoreError(format!("opening {}: {error}", path.display())))?;
        let (writer, epoch, refs, readers, checkpointer) = opened?;
        let config = StoreConfig {
            retention: config.retention.max(1),
            ..config
        };
        let (writes, queue) = mpsc::channel(QUEUE);
        let writer_config = config.clone();
        let cannot_start = |error| StoreError(format!("cannot start a sqlite thread: {error}"));
        std::thread::Builder::new()
            .name("chat-sqlite-writer".into())
            .spawn(move || {
                write_loop(writer, queue, writer_config, refs);
                drop(lock);
            })
            .map_err(cannot_start)?;
        let (checkpoints, stop) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("chat-sqlite-checkpoints".into())
            .spawn(move || checkpoint_loop(checkpointer, stop))
            .map_err(cannot_start)?;
        Ok(Self {
            shared: Arc::new(Shared {
                path,
                config,
                epoch,
                writes,
                readers: Mutex::new(readers),
                permits: Semaphore::new(READERS),
                _checkpoints: checkpoints,
            }),
        })
    }

    /// The file this store keeps its history in.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn write<T>(
        &self,
        write: Write,
        answer: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.shared
            .writes
            .send(write)
            .await
            .map_err(|_| StoreError("the sqlite writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError("the sqlite writer stopped".into()))?
    }

    /// Runs `read` on a pooled read-only connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = &self.shared;
        let _permit = shared
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError("store closed".into()))?;
        let conn = match lock(&shared.readers).pop() {
            Some(conn) => conn,
            None => open_reader(&shared.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = read(&conn);
            (conn, result)
        })
        .await
        .map_err(|error| StoreError(format!("sqlite read: {error}")))?;
        lock(&shared.readers).push(conn);
        result.map_err(failed)
    }

    async fn page(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let conversation = key(conversation);
        let retention = signed(self.shared.config.retention as u64);
        let oldest_ts = signed(self.shared.config.oldest_kept_ts());
        let (before, after) = (before.map(signed), after.map(signed));
        self.read(move |conn| {
            page(
                conn,
                &conversation,
                before,
                after,
                limit,
                retention,
                oldest_ts,
            )
        })
        .await
    }
}

#[async_trait]
impl HistoryStore for SqliteHistoryStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write::Append {
            conversation: key(conversation),
            direct: matches!(conversation, Conversation::Direct(..)),
            message: Owned {
                from: message.from.to_owned(),
                to: message.to.map(str::to_owned),
                body: message.body.to_owned(),
                ts: signed(message.ts),
                reference: message.reference.map(str::to_owned),
            },
            reply,
        };
        self.write(write, answer).await
    }

    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.page(conversation, before, None, limit).await
    }

    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.page(conversation, None, Some(after), limit).await
    }

    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let write = Write::MarkRead {
            reader: user.to_owned(),
            conversation: key(conversation),
            id: signed(id),
            reply,
        };
        self.write(write, answer).await
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        let user = user.to_owned();
        let retention = signed(self.shared.config.retention as u64);
        let oldest_ts = signed(self.shared.config.oldest_kept_ts());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT p.partner, c.last_id, coalesce(r.id, 0), \
                   (SELECT count(*) FROM messages m WHERE m.conversation = p.conversation \
                      AND m.id > coalesce(r.id, 0) AND m.id > c.last_id - ?2 AND m.ts >= ?3 \
                      AND m.sender = p.partner) \
                 FROM partners p JOIN conversations c ON c.key = p.conversation \
                 LEFT JOIN reads r ON r.reader = p.owner AND r.conversation = p.conversation \
                 WHERE p.owner = ?1 ORDER BY p.recency DESC",
            )?
            .query_map(params![user, retention, oldest_ts], |row| {
                Ok(InboxEntry {
                    with: row.get(0)?,
                    last_id: unsigned(row.get(1)?),
                    read_id: unsigned(row.get(2)?),
                    unread: unsigned(row.get(3)?),
                })
            })?
            .collect()
        })
        .await
    }

    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let user = user.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT p.partner, c.last_id FROM partners p \
                 JOIN conversations c ON c.key = p.conversation WHERE p.owner = ?1",
            )?
            .query_map([user], |row| Ok((row.get(0)?, unsigned(row.get(1)?))))?
            .collect()
        })
        .await
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        Ok(self.shared.epoch.clone())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
    }

    /// A SIGKILL loses nothing the OS has, so only the settings show that a commit (and so an
    /// ack) waits for the disk: WAL with `synchronous = FULL` on the writing connection.
    #[test]
    fn the_writer_commits_to_disk() {
        let dir = std::env::temp_dir().join(format!("chat-sqlite-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (conn, _) = open_writer(&dir.join("sync.db")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), synchronous), ("wal", 2), "2 is FULL");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whatever piled up, maintenance catches up within the round it is due, a bounded chunk
    /// per batch; one chunk every ten seconds could not keep pace with a thousand appends a
    /// second.
    #[test]
    fn maintenance_catches_up_a_chunk_per_batch() {
        let dir = std::env::temp_dir().join(format!("chat-sqlite-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("maintenance.db");
        let _ = std::fs::remove_file(&path);
        let (conn, _) = open_writer(&path).unwrap();
        let config = StoreConfig {
            max_age: Some(Duration::from_secs(3_600)),
            ..StoreConfig::default()
        };
        let old = signed(now_ms()) - 7_200_000;
        let piled = 5 * MAINTENANCE_CHUNK;
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO ref_log (conversation, sender, ref, id, ts) \
             SELECT 'r:lobby', 'alice', 'r' || i, i, ?2 FROM n",
            params![piled, old],
        )
        .unwrap();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO messages (conversation, id, sender, recipient, body, ts) \
             SELECT 'r:lobby', i, 'alice', NULL, 'old', ?2 FROM n",
            params![piled, old],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO messages (conversation, id, sender, recipient, body, ts) \
             VALUES ('r:lobby', ?1, 'alice', NULL, 'new', ?2)",
            params![piled + 1, signed(now_ms())],
        )
        .unwrap();
        let mut refs = Refs::load(&conn, 600_000).unwrap();

        let mut maintenance = Maintenance::new();
        maintenance.after_batch(&conn, &config, &mut refs);
        assert_eq!(
            count(&conn, "ref_log"),
            piled,
            "maintenance ran before it was due"
        );
        maintenance.due = Instant::now();
        let mut batches = 0;
        while count(&conn, "ref_log") > 0 || count(&conn, "messages") > 1 {
            let before = count(&conn, "messages");
            maintenance.after_batch(&conn, &config, &mut refs);
            assert!(before - count(&conn, "messages") <= MAINTENANCE_CHUNK);
            batches += 1;
            assert!(batches <= 6, "maintenance stopped before catching up");
        }
        assert_eq!(
            count(&conn, "messages"),
            1,
            "a message within the age was deleted"
        );
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
