//! A throw-away PostgreSQL database per test.

/// A database created for one test and dropped by [`TestDatabase::drop_now`]
/// (left behind if the test fails, for inspection).
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
}

impl TestDatabase {
    /// Creates `fs_test_<purpose>_<random>` on the test server.
    pub async fn create(purpose: &str) -> anyhow::Result<Self> {
        let server = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        Self::create_on(&server, purpose).await
    }

    /// Creates `fs_test_<purpose>_<random>` on `server` (`postgres://…:port`).
    pub async fn create_on(server: &str, purpose: &str) -> anyhow::Result<Self> {
        let name = format!("fs_test_{purpose}_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}/{name}", server.trim_end_matches('/'));
        flashsale_db::create_database_if_missing(&url).await?;
        Ok(Self { url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database (closing any connection still open to it).
    pub async fn drop_now(self) -> anyhow::Result<()> {
        flashsale_db::drop_database(&self.url).await?;
        Ok(())
    }
}
