//! The server store on PostgreSQL, which several server instances may share.
//!
//! Appends from different instances to one document are serialised by the document's row lock:
//! a write transaction locks the rows of the documents it appends to (its first statement upserts
//! them, in sorted order, and `ON CONFLICT … DO UPDATE` locks each existing row) before it reads a client's last batch or assigns a cursor, so two instances can neither hand
//! out the same cursor nor both store a re-sent batch. Read transactions run at REPEATABLE READ
//! so that a document's row and its log are read from one snapshot. The SQL itself is shared
//! with SQLite; see `store::sql`.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

use super::sql::sql_store;
use crate::{Error, Result};

/// The PostgreSQL store. Cloning shares the connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The push outbox's switch (see `store::push`).
    push: std::sync::Arc<super::push::PushSwitch>,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…`) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new().connect(url).await?;
        Self::migrate(pool).await
    }

    /// Connects like [`PgStore::connect`], but keeps every table in `schema` (created if missing)
    /// by setting the `search_path` of each connection of the pool.
    ///
    /// Tests run in parallel against one database this way, each in a schema of its own that it
    /// drops at the end.
    pub async fn connect_isolated(url: &str, schema: &str) -> Result<Self> {
        if schema.is_empty() || schema.contains('\0') {
            return Err(Error::Invalid(format!("{schema:?} is not a schema name")));
        }
        let schema = format!("\"{}\"", schema.replace('"', "\"\""));
        let mut conn = PgConnection::connect(url).await?;
        conn.execute(sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")))
            .await?;
        conn.close().await?;
        let set_search_path = format!("SET search_path TO {schema}");
        let pool = PgPoolOptions::new()
            .after_connect(move |conn, _meta| {
                let set_search_path = set_search_path.clone();
                Box::pin(async move {
                    conn.execute(sqlx::raw_sql(&set_search_path)).await?;
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        Self::migrate(pool).await
    }

    /// The pool write transactions run on: any connection.
    fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// Called after each committed append: nothing to do on PostgreSQL.
    fn after_write(&self) {}

    /// Runs the migrations (creating `_sqlx_migrations` in the first schema of the search path).
    async fn migrate(pool: PgPool) -> Result<Self> {
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgStore {
            pool,
            push: std::sync::Arc::default(),
        })
    }
}

sql_store! {
    store: PgStore,
    database: ::sqlx::Postgres,
    begin_write: "BEGIN",
    begin_read: "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    numbered_placeholders: true,
    joined_statements: false,
    claim_lock: " FOR UPDATE SKIP LOCKED",
}
