//! Helpers shared by this crate's unit tests (compiled only for tests).

use im_store::sqlite::{SqliteOptions, SqliteStore};

/// A real SQLite store in a fresh temporary directory, which must outlive the store.
pub(crate) async fn temporary_store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("im.db"), SqliteOptions::default())
        .await
        .unwrap();
    (dir, store)
}
