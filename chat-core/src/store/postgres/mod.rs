//! [`PostgresHistoryStore`]: history in PostgreSQL, shared by every node (cargo feature
//! `postgres`).
//!
//! # Ids across nodes, in order
//!
//! A database sequence hands out numbers in the order transactions ask, but they commit in
//! whatever order they finish, so a reader can see id 8 before id 7 exists; resuming from 8 would
//! then skip 7 forever. Here each conversation's ids come from its own row in `conversations`:
//! an append takes `last_id + 1` while holding that row locked until its transaction commits, so
//! the next append to the same conversation, on any node, waits for that commit. A
//! conversation's ids therefore commit in id order, and whoever sees id `n` sees every id below
//! it: the rule the engine's gap repair relies on. The price is that one conversation's appends
//! serialize on their row; group commit makes that cheap.
//!
//! # Group commit
//!
//! Appends and read positions queue up for a writer task, which takes everything that queued
//! while its previous batch ran (up to a thousand) and sends it as **one** call to the
//! `write_batch` function (installed with the schema): one round trip, one transaction, one
//! commit, with `fsync` as PostgreSQL is configured (on by default). No request of a batch is
//! answered before that commit returns, so an `ack` names a durable message. The function locks
//! the batch's conversations in key order first, and writes read positions in key order too, so
//! concurrent batches of different nodes wait for each other instead of deadlocking. A batch is atomic: if it fails, every request in it
//! gets an error and nothing of it is stored. Inside, the function is set-based (each table is
//! written by one statement per batch), so a batch of a hundred costs little more than a batch of
//! one, and the writer yields briefly after answering a batch so that the senders it woke can
//! queue their next appends into the next one.
//!
//! # Retention
//!
//! Exact at read time. What falls out by count is deleted by the batch that pushed it out; every
//! ten seconds a task of its own deletes expired refs and messages past the age limit, chunk by
//! chunk until none are left, skipping rows a batch holds so that it never waits for one.
//!
//! # Schema and connections
//!
//! Tables live in a schema of their own (`chat` by default), created and migrated at start,
//! idempotently, under an advisory lock so that nodes starting together migrate once. Reads and
//! writes share a deadpool pool of connections that are checked before use, so a database that
//! went away and came back costs only the requests that were in flight: the store recovers by
//! itself. A database that stops answering fails a request after five seconds (a client-side
//! timeout that also drops the connection, and `statement_timeout` on the server) instead of
//! hanging it. Sessions run with `synchronous_commit = on`, whatever the server's default, since
//! an `ack` promises the commit is flushed.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::{
    Appended, Conversation, HistoryStore, InboxEntry, NewMessage, Page, StoreConfig, StoreError,
    StoredMessage,
};

const SCHEMA_VERSION: i64 = 1;
/// Most requests one batch takes.
const MAX_BATCH: usize = 1_000;
/// Requests that may wait for the writer; more wait to be queued.
const QUEUE: usize = 10_000;
/// How often the writer yields after answering a batch, for the senders it woke to queue again.
const YIELDS: usize = 4;
const POOL_SIZE: usize = 16;
/// How long taking a connection may take before the store reports itself unavailable.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a batch or a read may take: past it the request is answered `unavailable` and its
/// connection dropped (the server also cancels it: `statement_timeout`). A stalled or silently
/// cut connection fails requests in seconds, not at the kernel's TCP timeout.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest dedup window the SQL arithmetic is given (about 140,000 years).
const WINDOW_CAP: u64 = 1 << 52;
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);
const MAINTENANCE_CHUNK: i64 = 10_000;
/// An arbitrary constant: the advisory lock that serializes migrations.
const MIGRATION_LOCK: i64 = 0x0063_6861_746d_6967;

/// A [`HistoryStore`] in PostgreSQL. Cheap to clone; clones share one pool.
///
/// ```no_run
/// use chat_core::store::{PostgresHistoryStore, StoreConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chat_core::store::StoreError> {
/// let url = "postgres://chat@localhost/chat";
/// let store = PostgresHistoryStore::connect(url, "chat", StoreConfig::default()).await?;
/// # drop(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresHistoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    schema: String,
    config: StoreConfig,
    epoch: String,
    writes: mpsc::Sender<Write>,
}

/// One request for the writer, with where its answer goes.
struct Write {
    kind: &'static str,
    conversation: String,
    sender: String,
    recipient: Option<String>,
    body: Option<String>,
    /// The ts of an append, the id of a read position.
    value: i64,
    reference: Option<String>,
    direct: bool,
    reply: oneshot::Sender<Result<Row, StoreError>>,
}

/// What `write_batch` returned for one request.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    duplicate: bool,
    sender: Option<String>,
    recipient: Option<String>,
    body: Option<String>,
    ts: Option<i64>,
}

fn failed(error: impl std::fmt::Display) -> StoreError {
    StoreError(format!("postgres: {error}"))
}

/// A pool error; one from the database carries the server's own message.
fn unavailable(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => database(error),
        other => failed(other),
    }
}

/// A driver error with the server's own message, which its `Display` leaves out.
fn database(error: tokio_postgres::Error) -> StoreError {
    match error.as_db_error() {
        Some(db) => StoreError(format!(
            "postgres: {} ({}){}",
            db.message(),
            db.code().code(),
            db.where_()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default()
        )),
        None => failed(error),
    }
}

fn key(conversation: &Conversation) -> String {
    match conversation {
        Conversation::Room(room) => format!("r:{room}"),
        Conversation::Direct(a, b) => format!("d:{a}:{b}"),
    }
}

/// PostgreSQL integers are signed: anything larger saturates.
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// PostgreSQL text cannot hold NUL; refuse it rather than fail a whole batch.
fn storable(text: &str) -> Result<(), StoreError> {
    if text.contains('\0') {
        return Err(StoreError(
            "text with a NUL character cannot be stored".into(),
        ));
    }
    Ok(())
}

/// A schema name: a plain lowercase identifier, so it can be written into SQL as is.
fn check_schema(schema: &str) -> Result<(), StoreError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(StoreError(format!(
            "invalid schema name {schema:?}: use lowercase letters, digits and _"
        )))
    }
}

impl PostgresHistoryStore {
    /// Connects to the database at `url` (`postgres://user@host/db`, or with
    /// `?host=/run/postgresql` for a Unix socket), keeping the tables in `schema`, which is
    /// created and migrated if needed.
    pub async fn connect(url: &str, schema: &str, config: StoreConfig) -> Result<Self, StoreError> {
        check_schema(schema)?;
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|error| StoreError(format!("invalid PostgreSQL URL: {error}")))?;
        pg.connect_timeout(CONNECTION_TIMEOUT);
        pg.keepalives_idle(Duration::from_secs(10));
        // Durable before ack whatever the server's default, and never waiting forever.
        let options = format!(
            "{} -c synchronous_commit=on -c statement_timeout={}",
            pg.get_options().unwrap_or(""),
            QUERY_TIMEOUT.as_millis()
        );
        pg.options(options.trim());
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECTION_TIMEOUT))
            .create_timeout(Some(CONNECTION_TIMEOUT))
            .recycle_timeout(Some(CONNECTION_TIMEOUT))
            .build()
            .map_err(failed)?;
        let epoch = migrate(&pool, schema).await?;
        let config = StoreConfig {
            retention: config.retention.max(1),
            ..config
        };
        let (writes, queue) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(
            pool.clone(),
            schema.to_owned(),
            config.clone(),
            queue,
        ));
        tokio::spawn(maintenance_loop(
            pool.clone(),
            schema.to_owned(),
            config.clone(),
            writes.downgrade(),
        ));
        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                schema: schema.to_owned(),
                config,
                epoch,
                writes,
            }),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.shared.pool.get().await.map_err(unavailable)
    }

    async fn write(
        &self,
        write: Write,
        answer: oneshot::Receiver<Result<Row, StoreError>>,
    ) -> Result<Row, StoreError> {
        self.shared
            .writes
            .send(write)
            .await
            .map_err(|_| StoreError("the postgres writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError("the postgres writer stopped".into()))?
    }

    async fn page(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let schema = &self.shared.schema;
        let config = &self.shared.config;
        let client = self.client().await?;
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let retention = signed(config.retention as u64);
        let oldest_ts = signed(config.oldest_kept_ts());
        let conversation = key(conversation);
        // One statement, one snapshot: the page and the conversation's newest id agree.
        let (sql, bound) = match after {
            Some(after) => (
                format!(
                    "SELECT c.last_id, m.id, m.sender, m.recipient, m.body, m.ts FROM \
                     (SELECT coalesce(max(last_id), 0) AS last_id FROM {schema}.conversations \
                       WHERE key = $1) c \
                     LEFT JOIN LATERAL (SELECT * FROM {schema}.messages WHERE conversation = $1 \
                       AND id > greatest($2, c.last_id - $3) AND ts >= $4 ORDER BY id LIMIT $5) m \
                     ON true ORDER BY m.id"
                ),
                signed(after),
            ),
            None => (
                format!(
                    "SELECT c.last_id, m.id, m.sender, m.recipient, m.body, m.ts FROM \
                     (SELECT coalesce(max(last_id), 0) AS last_id FROM {schema}.conversations \
                       WHERE key = $1) c \
                     LEFT JOIN LATERAL (SELECT * FROM {schema}.messages WHERE conversation = $1 \
                       AND id < $2 AND id > c.last_id - $3 AND ts >= $4 \
                       ORDER BY id DESC LIMIT $5) m \
                     ON true ORDER BY m.id DESC"
                ),
                before.map_or(i64::MAX, signed),
            ),
        };
        let (last_id, mut messages) = read(client, async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client
                .query(
                    &statement,
                    &[&conversation, &bound, &retention, &oldest_ts, &fetch],
                )
                .await?;
            let last_id: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            let mut messages = Vec::new();
            for row in &rows {
                let Some(id) = row.try_get::<_, Option<i64>>(1)? else {
                    continue;
                };
                messages.push(StoredMessage {
                    id: unsigned(id),
                    from: row.try_get(2)?,
                    to: row.try_get(3)?,
                    body: row.try_get(4)?,
                    ts: unsigned(row.try_get(5)?),
                });
            }
            Ok((last_id, messages))
        })
        .await?;
        let more = messages.len() > limit;
        messages.truncate(limit);
        if after.is_none() {
            messages.reverse();
        }
        Ok(Page {
            messages,
            more,
            last_id: unsigned(last_id),
        })
    }
}

/// Creates or updates the schema, once across nodes, and returns the store's epoch.
async fn migrate(pool: &Pool, schema: &str) -> Result<String, StoreError> {
    let mut client = pool.get().await.map_err(|error| {
        StoreError(format!(
            "cannot connect to PostgreSQL: {}",
            unavailable(error).0
        ))
    })?;
    let tx = client.transaction().await.map_err(database)?;
    // Waiting for another node's migration is not a stall.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(database)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(database)?;
    let exists = tx
        .query_opt(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'meta'",
            &[&schema],
        )
        .await
        .map_err(database)?
        .is_some();
    if exists {
        let version: Option<String> = tx
            .query_opt(
                &format!("SELECT value FROM {schema}.meta WHERE key = 'schema_version'"),
                &[],
            )
            .await
            .map_err(database)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(database)?;
        let version: i64 = version.and_then(|v| v.parse().ok()).unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "schema {schema} has version {version}, newer than this program's {SCHEMA_VERSION}"
            )));
        }
    }
    tx.batch_execute(&include_str!("schema.sql").replace("chat_schema", schema))
        .await
        .map_err(database)?;
    tx.execute(
        &format!(
            "INSERT INTO {schema}.meta (key, value) VALUES ('epoch', $1), ('schema_version', $2) \
             ON CONFLICT (key) DO NOTHING"
        ),
        &[
            &crate::layer::unique_channel_name("postgres"),
            &SCHEMA_VERSION.to_string(),
        ],
    )
    .await
    .map_err(database)?;
    let epoch: String = tx
        .query_one(
            &format!("SELECT value FROM {schema}.meta WHERE key = 'epoch'"),
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(database)?;
    tx.commit().await.map_err(database)?;
    Ok(epoch)
}

/// The writer: one `write_batch` call per batch of whatever queued meanwhile.
async fn write_loop(
    pool: Pool,
    schema: String,
    config: StoreConfig,
    mut queue: mpsc::Receiver<Write>,
) {
    let sql = format!(
        "SELECT out_id, out_duplicate, out_sender, out_recipient, out_body, out_ts \
         FROM {schema}.write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    );
    let window = signed(
        u64::try_from(config.dedup_window.as_millis())
            .unwrap_or(u64::MAX)
            .min(WINDOW_CAP),
    );
    let retention = signed(config.retention as u64);
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let answered = batch.len();
        let result = run_batch(&pool, &sql, &batch, window, retention).await;
        match result {
            Ok(rows) if rows.len() == batch.len() => {
                for (write, row) in batch.into_iter().zip(rows) {
                    let _ = write.reply.send(Ok(row));
                }
            }
            Ok(rows) => {
                let error = StoreError(format!(
                    "postgres: write_batch answered {} of {} requests",
                    rows.len(),
                    batch.len()
                ));
                for write in batch {
                    let _ = write.reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for write in batch {
                    let _ = write.reply.send(Err(error.clone()));
                }
            }
        }
        // Let the tasks these answers woke run before collecting the next batch: a sender
        // whose append was just acknowledged often has its next one ready, and two half
        // batches cost two commits where one whole batch costs one.
        if answered > 1 {
            for _ in 0..YIELDS {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Every [`MAINTENANCE_EVERY`] until the store is dropped, forgets expired refs and messages past
/// the maximum age, on a connection of its own beside the writer's, never holding it up.
async fn maintenance_loop(
    pool: Pool,
    schema: String,
    config: StoreConfig,
    store: mpsc::WeakSender<Write>,
) {
    loop {
        tokio::time::sleep(MAINTENANCE_EVERY).await;
        if store.upgrade().is_none() {
            return;
        }
        if let Err(error) = catch_up(&pool, &schema, &config).await {
            tracing::warn!(%error, "postgres maintenance failed");
        }
    }
}

/// Deletes what is due, a chunk per statement until nothing is left: however fast appends come,
/// deletion keeps pace.
async fn catch_up(pool: &Pool, schema: &str, config: &StoreConfig) -> Result<(), StoreError> {
    while maintain(pool, schema, config).await? >= MAINTENANCE_CHUNK as u64 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn run_batch(
    pool: &Pool,
    sql: &str,
    batch: &[Write],
    window: i64,
    retention: i64,
) -> Result<Vec<Row>, StoreError> {
    let kinds: Vec<&str> = batch.iter().map(|w| w.kind).collect();
    let conversations: Vec<&str> = batch.iter().map(|w| w.conversation.as_str()).collect();
    let senders: Vec<&str> = batch.iter().map(|w| w.sender.as_str()).collect();
    let recipients: Vec<Option<&str>> = batch.iter().map(|w| w.recipient.as_deref()).collect();
    let bodies: Vec<Option<&str>> = batch.iter().map(|w| w.body.as_deref()).collect();
    let values: Vec<i64> = batch.iter().map(|w| w.value).collect();
    let references: Vec<Option<&str>> = batch.iter().map(|w| w.reference.as_deref()).collect();
    let directs: Vec<bool> = batch.iter().map(|w| w.direct).collect();
    let client = pool.get().await.map_err(unavailable)?;
    let call = async {
        let statement = client.prepare_cached(sql).await?;
        // One statement outside any explicit transaction: it runs, and commits, as one.
        client
            .query(
                &statement,
                &[
                    &kinds,
                    &conversations,
                    &senders,
                    &recipients,
                    &bodies,
                    &values,
                    &references,
                    &directs,
                    &window,
                    &retention,
                ],
            )
            .await
    };
    let rows = match tokio::time::timeout(QUERY_TIMEOUT, call).await {
        Ok(rows) => rows.map_err(database)?,
        Err(_) => {
            // Whatever that connection is stuck in, it is not reused.
            drop(deadpool_postgres::Object::take(client));
            return Err(timed_out());
        }
    };
    rows.iter()
        .map(|row| {
            Ok(Row {
                id: row.try_get(0)?,
                duplicate: row.try_get(1)?,
                sender: row.try_get(2)?,
                recipient: row.try_get(3)?,
                body: row.try_get(4)?,
                ts: row.try_get(5)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(database)
}

fn timed_out() -> StoreError {
    StoreError(format!(
        "postgres: no answer within {} s",
        QUERY_TIMEOUT.as_secs()
    ))
}

/// Runs a read with [`QUERY_TIMEOUT`], dropping its connection if it stalls.
async fn read<T>(
    client: deadpool_postgres::Object,
    query: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query(&client)).await {
        Ok(result) => result.map_err(database),
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Err(timed_out())
        }
    }
}

/// Forgets refs whose window has ended and messages older than the maximum age, a chunk at a
/// time.
///
/// Rows a writer holds are skipped (`SKIP LOCKED`), so this never waits for a batch, and a batch
/// waits at most for one chunk's delete: the two cannot deadlock. Says how many rows the larger
/// of the two deletes took.
async fn maintain(pool: &Pool, schema: &str, config: &StoreConfig) -> Result<u64, StoreError> {
    let client = pool.get().await.map_err(unavailable)?;
    let window = signed(u64::try_from(config.dedup_window.as_millis()).unwrap_or(u64::MAX));
    let cutoff = signed(super::now_ms()).saturating_sub(window);
    let refs = client
        .execute(
            &format!(
                "DELETE FROM {schema}.refs WHERE ctid IN \
                 (SELECT ctid FROM {schema}.refs WHERE ts < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            &[&cutoff, &MAINTENANCE_CHUNK],
        )
        .await
        .map_err(database)?;
    let messages = match config.max_age {
        Some(_) => client
            .execute(
                &format!(
                    "DELETE FROM {schema}.messages WHERE ctid IN \
                     (SELECT ctid FROM {schema}.messages WHERE ts < $1 LIMIT $2 \
                      FOR UPDATE SKIP LOCKED)"
                ),
                &[&signed(config.oldest_kept_ts()), &MAINTENANCE_CHUNK],
            )
            .await
            .map_err(database)?,
        None => 0,
    };
    Ok(refs.max(messages))
}

#[async_trait]
impl HistoryStore for PostgresHistoryStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError> {
        storable(message.body)?;
        if let Some(reference) = message.reference {
            storable(reference)?;
        }
        let direct = matches!(conversation, Conversation::Direct(..));
        if direct && message.to.is_none() {
            // It would fail the whole batch it landed in.
            return Err(StoreError("a direct message needs a recipient".into()));
        }
        let (reply, answer) = oneshot::channel();
        let write = Write {
            kind: "a",
            conversation: key(conversation),
            sender: message.from.to_owned(),
            recipient: message.to.map(str::to_owned),
            body: Some(message.body.to_owned()),
            value: signed(message.ts),
            reference: message.reference.map(str::to_owned),
            direct,
            reply,
        };
        let row = self.write(write, answer).await?;
        let unexpected = || StoreError("postgres: write_batch returned no message".into());
        Ok(Appended {
            message: StoredMessage {
                id: unsigned(row.id),
                from: row.sender.ok_or_else(unexpected)?,
                to: row.recipient,
                body: row.body.ok_or_else(unexpected)?,
                ts: unsigned(row.ts.ok_or_else(unexpected)?),
            },
            duplicate: row.duplicate,
        })
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
        let write = Write {
            kind: "r",
            conversation: key(conversation),
            sender: user.to_owned(),
            recipient: None,
            body: None,
            value: signed(id),
            reference: None,
            direct: false,
            reply,
        };
        Ok(unsigned(self.write(write, answer).await?.id))
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        let schema = &self.shared.schema;
        let config = &self.shared.config;
        let client = self.client().await?;
        let sql = format!(
                "SELECT p.partner, c.last_id, coalesce(r.id, 0), \
                   (SELECT count(*) FROM {schema}.messages m \
                     WHERE m.conversation = p.conversation AND m.id > coalesce(r.id, 0) \
                       AND m.id > c.last_id - $2 AND m.ts >= $3 AND m.sender = p.partner) \
                 FROM {schema}.partners p \
                 JOIN {schema}.conversations c ON c.key = p.conversation \
                 LEFT JOIN {schema}.reads r ON r.reader = p.owner AND r.conversation = p.conversation \
                 WHERE p.owner = $1 ORDER BY p.recency DESC"
            );
        let retention = signed(config.retention as u64);
        let oldest_ts = signed(config.oldest_kept_ts());
        read(client, async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client
                .query(&statement, &[&user, &retention, &oldest_ts])
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(InboxEntry {
                        with: row.try_get(0)?,
                        last_id: unsigned(row.try_get(1)?),
                        read_id: unsigned(row.try_get(2)?),
                        unread: unsigned(row.try_get(3)?),
                    })
                })
                .collect()
        })
        .await
    }

    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let schema = &self.shared.schema;
        let client = self.client().await?;
        let sql = format!(
            "SELECT p.partner, c.last_id FROM {schema}.partners p \
             JOIN {schema}.conversations c ON c.key = p.conversation WHERE p.owner = $1"
        );
        read(client, async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &[&user]).await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, unsigned(row.try_get(1)?))))
                .collect()
        })
        .await
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        Ok(self.shared.epoch.clone())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        read(client, async |client| {
            client.simple_query("SELECT 1").await.map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn count(client: &deadpool_postgres::Object, schema: &str, table: &str) -> i64 {
        client
            .query_one(&format!("SELECT count(*) FROM {schema}.{table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// One maintenance round deletes everything due, whatever piled up, a bounded chunk per
    /// statement; one chunk every ten seconds could not keep pace with a thousand appends a
    /// second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn maintenance_catches_up_in_one_round() {
        let url = std::env::var("CHAT_TEST_DATABASE_URL")
            .expect("CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh");
        let schema = format!("maintenance_{}", std::process::id());
        let config = StoreConfig {
            max_age: Some(Duration::from_secs(3_600)),
            ..StoreConfig::default()
        };
        let store = PostgresHistoryStore::connect(&url, &schema, config.clone())
            .await
            .unwrap();
        let client = store.client().await.unwrap();
        let old = signed(super::super::now_ms()) - 7_200_000;
        let piled = 3 * MAINTENANCE_CHUNK;
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.refs (conversation, sender, ref, id, ts) \
                     SELECT 'r:lobby', 'alice', 'r' || i, i, $2 FROM generate_series(1, $1::bigint) i"
                ),
                &[&piled, &old],
            )
            .await
            .unwrap();
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.messages (conversation, id, sender, body, ts) \
                     SELECT 'r:old', i, 'alice', 'old', $2 FROM generate_series(1, $1::bigint) i"
                ),
                &[&piled, &old],
            )
            .await
            .unwrap();
        store
            .append(
                &Conversation::room("lobby"),
                NewMessage {
                    from: "alice",
                    to: None,
                    body: "new",
                    ts: super::super::now_ms(),
                    reference: Some("kept"),
                },
            )
            .await
            .unwrap();

        catch_up(&store.shared.pool, &schema, &config)
            .await
            .unwrap();
        assert_eq!(count(&client, &schema, "refs").await, 1, "refs left behind");
        assert_eq!(
            count(&client, &schema, "messages").await,
            1,
            "messages left behind"
        );
    }

    fn url() -> String {
        std::env::var("CHAT_TEST_DATABASE_URL")
            .expect("CHAT_TEST_DATABASE_URL is not set: run ./scripts/test.sh")
    }

    async fn fresh(name: &str, config: StoreConfig) -> (PostgresHistoryStore, String) {
        let schema = format!("batch_{name}_{}", std::process::id());
        let store = PostgresHistoryStore::connect(&url(), &schema, config)
            .await
            .unwrap();
        (store, schema)
    }

    fn sql(schema: &str) -> String {
        format!(
            "SELECT out_id, out_duplicate, out_sender, out_recipient, out_body, out_ts \
             FROM {schema}.write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
    }

    fn append(conversation: &Conversation, from: &str, body: &str, reference: &str) -> Write {
        let to = match conversation {
            Conversation::Room(_) => None,
            Conversation::Direct(a, b) => Some(if a == from { b.clone() } else { a.clone() }),
        };
        Write {
            kind: "a",
            conversation: key(conversation),
            sender: from.to_owned(),
            recipient: to,
            body: Some(body.to_owned()),
            value: 1_000,
            reference: Some(reference.to_owned()),
            direct: matches!(conversation, Conversation::Direct(..)),
            reply: oneshot::channel().0,
        }
    }

    fn read_position(reader: &str, conversation: &str, id: i64) -> Write {
        Write {
            kind: "r",
            conversation: conversation.to_owned(),
            sender: reader.to_owned(),
            recipient: None,
            body: None,
            value: id,
            reference: None,
            direct: false,
            reply: oneshot::channel().0,
        }
    }

    const WINDOW: i64 = 600_000;

    /// An ack waits for the commit's flush whatever the server's default says.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_are_synchronous() {
        let (store, _) = fresh("sync", StoreConfig::default()).await;
        let client = store.client().await.unwrap();
        let setting: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(setting, "on");
    }

    /// Two nodes moving the same read positions in opposite orders wait for each other; before
    /// positions were written in key order, a fifth of such batches died as deadlocks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_positions_in_opposite_orders_never_deadlock() {
        let (store, schema) = fresh("reads", StoreConfig::default()).await;
        let pool = store.shared.pool.clone();
        let forward: Vec<Write> = (0..300)
            .map(|i| read_position(&format!("user{i}"), &format!("r:room{i}"), 1))
            .collect();
        let backward: Vec<Write> = (0..300)
            .rev()
            .map(|i| read_position(&format!("user{i}"), &format!("r:room{i}"), 2))
            .collect();
        let sql = sql(&schema);
        for _ in 0..10 {
            let (a, b) = tokio::join!(
                run_batch(&pool, &sql, &forward, WINDOW, 10_000),
                run_batch(&pool, &sql, &backward, WINDOW, 10_000)
            );
            a.unwrap();
            b.unwrap();
        }
        // Each request is answered with its position after the batch: only ever forward.
        let rows = run_batch(&pool, &sql, &forward, WINDOW, 10_000)
            .await
            .unwrap();
        assert!(rows.iter().all(|row| row.id == 2));
    }

    /// Later in a batch is more recent in the inbox, on both sides of a direct conversation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_inbox_orders_by_batch_position() {
        let (store, schema) = fresh("inbox", StoreConfig::default()).await;
        let batch = [
            append(
                &Conversation::direct("carol", "alice"),
                "carol",
                "older",
                "1",
            ),
            append(&Conversation::direct("alice", "bob"), "alice", "newer", "2"),
        ];
        run_batch(&store.shared.pool, &sql(&schema), &batch, WINDOW, 10_000)
            .await
            .unwrap();
        let inbox: Vec<String> = store
            .inbox("alice")
            .await
            .unwrap()
            .into_iter()
            .map(|entry| entry.with)
            .collect();
        assert_eq!(inbox, ["bob", "carol"]);
    }

    /// A retry gets the first copy back, whatever it says itself: from the table, even when
    /// another conversation's new message in the batch has the same id, and from the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_gets_the_first_copy_back() {
        let (store, schema) = fresh("retry", StoreConfig::default()).await;
        let (pool, sql) = (&store.shared.pool, sql(&schema));
        let a = Conversation::room("a");
        let b = Conversation::room("b");
        run_batch(
            pool,
            &sql,
            &[append(&a, "alice", "ORIGINAL", "x")],
            WINDOW,
            10_000,
        )
        .await
        .unwrap();
        let batch = [
            append(&b, "bob", "first in b", "y"),
            append(&a, "alice", "a different body", "x"),
            append(&b, "bob", "first in b, again but changed", "y"),
        ];
        let rows = run_batch(pool, &sql, &batch, WINDOW, 10_000).await.unwrap();
        assert_eq!((rows[0].id, rows[0].duplicate), (1, false));
        assert_eq!((rows[1].id, rows[1].duplicate), (1, true));
        assert_eq!(rows[1].body.as_deref(), Some("ORIGINAL"));
        assert_eq!((rows[2].id, rows[2].duplicate), (1, true));
        assert_eq!(rows[2].body.as_deref(), Some("first in b"));
    }

    /// Retention lowered since the last append (a restart with a smaller `--retention`, or
    /// nodes configured apart) deletes everything now beyond it, not just the newest range.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lowered_retention_catches_up() {
        let (store, schema) = fresh("retention", StoreConfig::default()).await;
        let (pool, sql) = (&store.shared.pool, sql(&schema));
        let room = Conversation::room("lobby");
        for i in 0..20 {
            let write = append(&room, "alice", "hi", &i.to_string());
            run_batch(pool, &sql, &[write], WINDOW, 10).await.unwrap();
        }
        let client = store.client().await.unwrap();
        assert_eq!(count(&client, &schema, "messages").await, 10);
        run_batch(
            pool,
            &sql,
            &[append(&room, "alice", "hi", "last")],
            WINDOW,
            3,
        )
        .await
        .unwrap();
        let ids: Vec<i64> = client
            .query(
                &format!("SELECT id FROM {schema}.messages ORDER BY id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(ids, [19, 20, 21]);
    }

    /// A window as long as `Duration::MAX` works (it used to overflow in SQL and fail batches).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_window_still_recognises_retries() {
        let config = StoreConfig {
            dedup_window: Duration::MAX,
            ..StoreConfig::default()
        };
        let (store, _) = fresh("window", config).await;
        let room = Conversation::room("lobby");
        let send = || NewMessage {
            from: "alice",
            to: None,
            body: "once",
            ts: 1_000,
            reference: Some("r"),
        };
        assert!(!store.append(&room, send()).await.unwrap().duplicate);
        assert!(store.append(&room, send()).await.unwrap().duplicate);
    }

    /// A database that stops answering (here: a row held locked by another session) fails the
    /// request in seconds instead of hanging it, and the store works again once it answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_database_fails_requests_instead_of_hanging_them() {
        let (store, schema) = fresh("stall", StoreConfig::default()).await;
        let room = Conversation::room("lobby");
        let send = |reference: &'static str| NewMessage {
            from: "alice",
            to: None,
            body: "hi",
            ts: super::super::now_ms(),
            reference: Some(reference),
        };
        store.append(&room, send("1")).await.unwrap();
        let (mut blocker, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
        tokio::spawn(connection);
        let hold = blocker.transaction().await.unwrap();
        hold.execute(
            &format!("SELECT * FROM {schema}.conversations WHERE key = 'r:lobby' FOR UPDATE"),
            &[],
        )
        .await
        .unwrap();
        let stalled = tokio::time::timeout(Duration::from_secs(30), store.append(&room, send("2")))
            .await
            .expect("the append hung");
        assert!(stalled.is_err(), "an append went through a locked counter");
        hold.rollback().await.unwrap();
        store.append(&room, send("3")).await.unwrap();
    }
}
