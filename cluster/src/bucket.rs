//! Opening the directory bucket with as many replicas as `cluster.kv_replicas` asks and the
//! NATS cluster can hold, so that the directory survives the loss of a NATS server.
//!
//! Never more replicas than the NATS cluster has servers: JetStream refuses that in a cluster,
//! and a lone server (2.9) takes it and then cannot load the stream after a restart. So the
//! bucket is created with `kv_replicas` capped at the servers the connected server advertises,
//! then with one fewer each time JetStream refuses, down to one; a bucket that exists with
//! fewer replicas than wanted (made by an older build, or while servers were missing) is
//! raised the same way. The replicas in force are logged and exported as `confab_cluster_kv_replicas`.

use async_nats::jetstream::{self, kv};

use super::{BUCKET, ClusterError};
use confab_actors::metrics as m;

/// Opens (creating or raising it if need be) the directory bucket. `servers` is how many
/// servers the NATS cluster has, as the server the node is connected to advertises them.
pub(super) async fn open(
    js: &jetstream::Context,
    wanted: usize,
    servers: usize,
) -> Result<kv::Store, ClusterError> {
    // A lone server takes a stream of three replicas (JetStream 2.9 even raises one to three)
    // and then cannot load it after a restart: never more replicas than servers.
    let wanted = wanted.clamp(1, servers.max(1));
    let kv = match js.get_key_value(BUCKET).await {
        Ok(kv) => kv,
        Err(_) => create(js, wanted).await?,
    };
    let info = kv
        .stream
        .get_info()
        .await
        .map_err(|e| ClusterError::Kv(e.to_string()))?;
    let mut replicas = info.config.num_replicas.max(1);
    if replicas < wanted {
        for n in (replicas + 1..=wanted).rev() {
            let mut config = info.config.clone();
            config.num_replicas = n;
            match js.update_stream(config).await {
                Ok(_) => {
                    tracing::info!(
                        from = replicas,
                        to = n,
                        "raised the directory bucket's replicas"
                    );
                    replicas = n;
                    break;
                }
                Err(e) => {
                    tracing::debug!(replicas = n, error = %e, "JetStream refused this many replicas");
                }
            }
        }
    }
    if replicas < wanted {
        tracing::warn!(
            replicas,
            wanted,
            "the directory bucket has fewer replicas than cluster.kv_replicas (the NATS cluster \
             has fewer servers?): losing a NATS server may lose the directory"
        );
    } else {
        tracing::info!(replicas, "directory bucket open");
    }
    metrics::gauge!(m::CLUSTER_KV_REPLICAS).set(replicas as f64);
    Ok(kv)
}

/// How many servers the NATS cluster of `client`'s server has: it advertises every server's
/// client address (itself included) in `connect_urls`, which a lone server leaves empty.
pub(super) fn servers(client: &async_nats::Client) -> usize {
    client.server_info().connect_urls.len().max(1)
}

/// Creates the bucket with `wanted` replicas, or fewer if JetStream refuses that many.
async fn create(js: &jetstream::Context, wanted: usize) -> Result<kv::Store, ClusterError> {
    let mut last_error = String::new();
    for replicas in (1..=wanted).rev() {
        match js
            .create_key_value(kv::Config {
                bucket: BUCKET.to_owned(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
        {
            Ok(kv) => return Ok(kv),
            Err(e) => {
                // Another node may have created it meanwhile.
                if let Ok(kv) = js.get_key_value(BUCKET).await {
                    return Ok(kv);
                }
                tracing::debug!(replicas, error = %e, "JetStream refused this many replicas");
                last_error = e.to_string();
            }
        }
    }
    Err(ClusterError::Kv(last_error))
}
