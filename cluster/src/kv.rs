//! The directory's bucket seam: what the cluster asks of the key-value store that holds one
//! record per endpoint (puts and deletes by the owning node, its last revision, reading every
//! key's last record, and watching the changes, all in revision order).
//!
//! - [`NatsBucket`]: the JetStream KV bucket `confab-endpoints` (opened by `bucket.rs`).
//! - [`MemoryBucket`](crate::memory::MemoryBucket): one map shared by the nodes of a
//!   [`MemoryNetwork`](crate::memory::MemoryNetwork) (tests, no NATS).

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use thiserror::Error;

use crate::transport::TransportFuture;
use crate::writes::WriteError;

/// What a change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeOp {
    Put,
    /// Deleted (or purged): the key has no record.
    Delete,
}

/// One change of the bucket, as a read or a watch delivers it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub key: String,
    pub op: ChangeOp,
    /// The record (empty for a delete).
    pub value: Bytes,
    /// The bucket's revision at this change; revisions grow with every change of any key.
    pub revision: u64,
    /// In a read of every key, how many come after this one (0 for a watch's changes).
    pub delta: u64,
}

/// A bucket's changes, in revision order.
pub(crate) type Changes = Pin<Box<dyn Stream<Item = Result<Change, BucketError>> + Send>>;

#[derive(Debug, Error)]
#[error("{0}")]
pub(crate) struct BucketError(pub String);

/// The directory's store (see the module's doc).
pub(crate) trait Bucket: Send + Sync + 'static {
    /// Puts `value` at `key`; the revision it landed at.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
    ) -> TransportFuture<'a, Result<u64, WriteError>>;

    /// Deletes `key`; with `revision`, only if the key is still at it (if not, a newer write
    /// is there and nothing is to be done: that is a success).
    fn delete<'a>(
        &'a self,
        key: &'a str,
        revision: Option<u64>,
    ) -> TransportFuture<'a, Result<(), WriteError>>;

    /// The revision of the bucket's last change (0: none yet).
    fn last_revision(&self) -> TransportFuture<'_, Result<u64, BucketError>>;

    /// The changes from now on.
    fn watch(&self) -> TransportFuture<'_, Result<Changes, BucketError>>;

    /// The last change of every key (deletes included) in revision order, each with how many
    /// follow, then the changes from then on.
    fn read_all(&self) -> TransportFuture<'_, Result<Changes, BucketError>>;
}

/// The JetStream KV bucket.
pub(crate) struct NatsBucket(pub kv::Store);

fn change(e: kv::Entry) -> Change {
    Change {
        key: e.key,
        op: match e.operation {
            kv::Operation::Put => ChangeOp::Put,
            kv::Operation::Delete | kv::Operation::Purge => ChangeOp::Delete,
        },
        value: e.value,
        revision: e.revision,
        delta: e.delta,
    }
}

fn changes(watch: kv::Watch) -> Changes {
    Box::pin(watch.map(|e| e.map(change).map_err(|e| BucketError(e.to_string()))))
}

impl Bucket for NatsBucket {
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
    ) -> TransportFuture<'a, Result<u64, WriteError>> {
        Box::pin(async move {
            match self.0.put(key, value).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == kv::PutErrorKind::InvalidKey => {
                    Err(WriteError::Permanent(e.to_string()))
                }
                Err(e) => Err(WriteError::Transient(e.to_string())),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        revision: Option<u64>,
    ) -> TransportFuture<'a, Result<(), WriteError>> {
        Box::pin(async move {
            match self.0.delete_expect_revision(key, revision).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::InvalidKey => {
                    Err(WriteError::Permanent(e.to_string()))
                }
                Err(e) => Err(WriteError::Transient(e.to_string())),
            }
        })
    }

    fn last_revision(&self) -> TransportFuture<'_, Result<u64, BucketError>> {
        Box::pin(async move {
            let info = self
                .0
                .stream
                .get_info()
                .await
                .map_err(|e| BucketError(e.to_string()))?;
            Ok(info.state.last_sequence)
        })
    }

    fn watch(&self) -> TransportFuture<'_, Result<Changes, BucketError>> {
        Box::pin(async move {
            let watch = self
                .0
                .watch_all()
                .await
                .map_err(|e| BucketError(e.to_string()))?;
            Ok(changes(watch))
        })
    }

    fn read_all(&self) -> TransportFuture<'_, Result<Changes, BucketError>> {
        Box::pin(async move {
            let watch = self
                .0
                .watch_with_history(">")
                .await
                .map_err(|e| BucketError(e.to_string()))?;
            Ok(changes(watch))
        })
    }
}
