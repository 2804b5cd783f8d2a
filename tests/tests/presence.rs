//! Contract §3 (presence) over real TCP: subscriptions, the same-user and public views,
//! change-only notifications, ranking of a user's endpoints, idle extrapolation across
//! `inactive_after` / `away_after`, manual status and signing out.

use confab_protocol::*;
use confab_tests::*;
use futures::{SinkExt, StreamExt};
use rmpv::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const CAROL: &str = "sip:carol@example.com";
const NOBODY: &str = "sip:nobody@example.com";

/// How long to watch for a frame that must not come.
const QUIET: Duration = Duration::from_millis(150);

/// A client that reads frames as raw MessagePack values, to check which keys a map has.
struct ValueClient {
    framed: Framed<TcpStream, FrameCodec>,
}

impl ValueClient {
    async fn sign_in(addr: SocketAddr, user: &str, device: &str) -> ValueClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut c = ValueClient {
            framed: Framed::new(stream, FrameCodec::new(1 << 20)),
        };
        c.send(&ClientMsg::Hello {
            resume: None,
            rid: Some(1),
            version: 1,
            user: user.to_owned(),
            token: token(user),
            device: device.to_owned(),
            agent: None,
        })
        .await;
        let (_, m) = c.recv().await;
        assert!(matches!(m, ServerMsg::Welcome { .. }), "{m:?}");
        c.send(&ClientMsg::Ping { rid: Some(2) }).await;
        assert_eq!(c.recv().await.1, ServerMsg::Pong { rid: Some(2) });
        c
    }

    async fn send(&mut self, msg: &ClientMsg) {
        self.framed.send(msg).await.expect("send");
    }

    /// The next frame, both as a raw value and decoded.
    async fn recv(&mut self) -> (Value, ServerMsg) {
        let frame = match tokio::time::timeout(EVENT_TIMEOUT, self.framed.next()).await {
            Ok(Some(Ok(frame))) => frame,
            other => panic!("no frame: {other:?}"),
        };
        let value = rmpv::decode::read_value(&mut &frame[..]).expect("msgpack");
        (value, decode_server(&frame).expect("decodes"))
    }
}

/// The keys of a map value, sorted.
fn keys(v: &Value) -> Vec<String> {
    let Value::Map(entries) = v else {
        panic!("not a map: {v:?}")
    };
    let mut k: Vec<String> = entries
        .iter()
        .map(|(k, _)| k.as_str().expect("string key").to_owned())
        .collect();
    k.sort();
    k
}

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    let Value::Map(entries) = v else {
        panic!("not a map: {v:?}")
    };
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key:?} in {v:?}"))
}

/// What other users' subscribers see.
fn public(user: &str, availability: Availability) -> ServerMsg {
    ServerMsg::Presence {
        user: user.to_owned(),
        availability,
        most_active: None,
        endpoints: None,
        status: None,
    }
}

/// The full view with `idle_ms` left out: (availability, most_active, status,
/// [(endpoint, device, activity, rank)]).
type FullView = (
    Availability,
    Option<String>,
    Option<Option<Status>>,
    Vec<(String, String, EffectiveActivity, u32)>,
);

fn full_view(m: &ServerMsg) -> FullView {
    match m {
        ServerMsg::Presence {
            availability,
            most_active,
            endpoints,
            status,
            ..
        } => (
            *availability,
            most_active.clone(),
            *status,
            endpoints
                .as_ref()
                .unwrap_or_else(|| panic!("no endpoints in {m:?}"))
                .iter()
                .map(|e| (e.endpoint.clone(), e.device.clone(), e.activity, e.rank))
                .collect(),
        ),
        other => panic!("expected presence, got {other:?}"),
    }
}

/// The expected full view of endpoints listed most active first.
fn expect_full(
    availability: Availability,
    status: Option<Status>,
    ranked: &[(&str, &str, EffectiveActivity)],
) -> FullView {
    (
        availability,
        ranked.first().map(|(id, _, _)| (*id).to_owned()),
        Some(status),
        ranked
            .iter()
            .enumerate()
            .map(|(i, (id, device, a))| ((*id).to_owned(), (*device).to_owned(), *a, i as u32 + 1))
            .collect(),
    )
}

/// Signs in and waits for a `pong`, so the endpoint is known to presence before anyone
/// subscribes (see `an_endpoint_counts_in_presence_as_soon_as_it_is_welcomed`, which checks
/// that this wait is not needed).
async fn sign_in(addr: SocketAddr, user: &str, device: &str) -> Raw {
    let mut c = Raw::sign_in(addr, user, device).await;
    let rid = c.rid();
    c.send(&ClientMsg::Ping { rid }).await;
    assert_eq!(c.recv().await, ServerMsg::Pong { rid });
    c
}

/// Subscribes `c` to `users`, expects `ok` (after the `ok`s of requests still unanswered) then
/// one presence per user; returns those events.
async fn subscribe(c: &mut Raw, users: &[&str]) -> Vec<ServerMsg> {
    let rid = c.rid();
    c.send(&ClientMsg::Subscribe {
        rid,
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    })
    .await;
    loop {
        match c.recv().await {
            ServerMsg::Ok { rid: r } if r == rid => break,
            ServerMsg::Ok { .. } => {}
            other => panic!("expected ok, got {other:?}"),
        }
    }
    let mut events = Vec::new();
    for _ in users {
        events.push(c.recv().await);
    }
    events
}

/// The next frame that is not an `ok`; it must be a presence event.
async fn next_presence(c: &mut Raw) -> ServerMsg {
    loop {
        match c.recv().await {
            ServerMsg::Ok { .. } => {}
            m @ ServerMsg::Presence { .. } => return m,
            other => panic!("expected presence, got {other:?}"),
        }
    }
}

async fn publish(c: &mut Raw, activity: Activity, idle_ms: Option<u64>) {
    let rid = c.rid();
    c.send(&ClientMsg::DeviceState {
        rid,
        activity,
        idle_ms,
    })
    .await;
}

async fn set_status(c: &mut Raw, status: Option<Status>) {
    let rid = c.rid();
    c.send(&ClientMsg::SetStatus { rid, status }).await;
}

#[tokio::test]
async fn subscribe_is_ok_then_one_presence_per_user_at_once() {
    let node = start_node(|_| {});
    let _alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut carol = sign_in(node.addr, CAROL, "desk").await;
    let mut events = subscribe(&mut carol, &[ALICE, NOBODY]).await;
    events.sort_by_key(|m| match m {
        ServerMsg::Presence { user, .. } => user.clone(),
        _ => String::new(),
    });
    assert_eq!(
        events,
        vec![
            public(ALICE, Availability::Available),
            public(NOBODY, Availability::Offline),
        ]
    );
    carol.expect_silence(QUIET).await;
}

#[tokio::test]
async fn resubscribing_gets_the_current_state_again() {
    let node = start_node(|_| {});
    let mut carol = sign_in(node.addr, CAROL, "desk").await;
    assert_eq!(
        subscribe(&mut carol, &[NOBODY]).await,
        vec![public(NOBODY, Availability::Offline)]
    );
    assert_eq!(
        subscribe(&mut carol, &[NOBODY]).await,
        vec![public(NOBODY, Availability::Offline)]
    );
}

#[tokio::test]
async fn never_published_endpoint_is_available_with_unknown_activity_and_null_idle() {
    let node = start_node(|_| {});
    let mut alice = ValueClient::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = ValueClient::sign_in(node.addr, BOB, "desk").await;

    // Alice watches herself: the full view.
    alice
        .send(&ClientMsg::Subscribe {
            rid: Some(5),
            users: vec![ALICE.to_owned()],
        })
        .await;
    assert_eq!(alice.recv().await.1, ServerMsg::Ok { rid: Some(5) });
    let (v, m) = alice.recv().await;
    assert_eq!(
        keys(&v),
        [
            "availability",
            "endpoints",
            "most_active",
            "status",
            "type",
            "user"
        ]
    );
    assert_eq!(get(&v, "status"), &Value::Nil, "status is an explicit null");
    let ServerMsg::Presence {
        user,
        availability,
        most_active,
        endpoints: Some(endpoints),
        status,
    } = m
    else {
        panic!("expected the full view, got {m:?}")
    };
    assert_eq!(user, ALICE);
    assert_eq!(availability, Availability::Available);
    assert_eq!(status, Some(None));
    assert_eq!(endpoints.len(), 1);
    let e = &endpoints[0];
    assert_eq!(most_active.as_ref(), Some(&e.endpoint));
    assert_eq!(e.device, "laptop");
    assert_eq!(e.activity, EffectiveActivity::Unknown);
    assert_eq!(e.idle_ms, None);
    assert_eq!(e.rank, 1);
    let Value::Array(eps) = get(&v, "endpoints") else {
        panic!("endpoints is not a list")
    };
    assert_eq!(
        keys(&eps[0]),
        ["activity", "device", "endpoint", "idle_ms", "rank"]
    );
    assert_eq!(get(&eps[0], "idle_ms"), &Value::Nil, "idle_ms is null");

    // Bob sees user and availability alone.
    bob.send(&ClientMsg::Subscribe {
        rid: Some(6),
        users: vec![ALICE.to_owned()],
    })
    .await;
    assert_eq!(bob.recv().await.1, ServerMsg::Ok { rid: Some(6) });
    let (v, m) = bob.recv().await;
    assert_eq!(keys(&v), ["availability", "type", "user"]);
    assert_eq!(m, public(ALICE, Availability::Available));
}

#[tokio::test]
async fn other_users_never_see_endpoints_status_or_most_active() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = ValueClient::sign_in(node.addr, BOB, "desk").await;
    bob.send(&ClientMsg::Subscribe {
        rid: Some(6),
        users: vec![ALICE.to_owned()],
    })
    .await;
    assert_eq!(bob.recv().await.1, ServerMsg::Ok { rid: Some(6) });
    bob.recv().await;
    set_status(&mut alice, Some(Status::Busy)).await;
    let (v, m) = bob.recv().await;
    assert_eq!(keys(&v), ["availability", "type", "user"]);
    assert_eq!(m, public(ALICE, Availability::Busy));
    publish(&mut alice, Activity::Inactive, Some(1000)).await;
    let (v, m) = bob.recv().await;
    assert_eq!(keys(&v), ["availability", "type", "user"]);
    assert_eq!(m, public(ALICE, Availability::BusyInactive));
}

#[tokio::test]
async fn device_state_change_is_notified_once_and_same_state_again_is_not() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let alice_id = alice.endpoint.clone();
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    assert_eq!(
        subscribe(&mut bob, &[ALICE]).await,
        vec![public(ALICE, Availability::Available)]
    );
    let own = subscribe(&mut alice, &[ALICE]).await;
    let unknown = [(alice_id.as_str(), "laptop", EffectiveActivity::Unknown)];
    assert_eq!(
        full_view(&own[0]),
        expect_full(Availability::Available, None, &unknown)
    );

    // The answer to device_state is ok.
    let rid = alice.rid();
    alice
        .send(&ClientMsg::DeviceState {
            rid,
            activity: Activity::Inactive,
            idle_ms: None,
        })
        .await;
    assert_eq!(alice.recv().await, ServerMsg::Ok { rid });
    let inactive = [(alice_id.as_str(), "laptop", EffectiveActivity::Inactive)];
    assert_eq!(
        full_view(&alice.recv().await),
        expect_full(Availability::Inactive, None, &inactive)
    );
    assert_eq!(bob.recv().await, public(ALICE, Availability::Inactive));

    // The same state again (a new stamp, so a new idle_ms): nothing to tell anyone. The next real
    // change must be the next event on both connections.
    publish(&mut alice, Activity::Inactive, None).await;
    publish(&mut alice, Activity::Inactive, Some(2000)).await;
    publish(&mut alice, Activity::Active, None).await;
    let active = [(alice_id.as_str(), "laptop", EffectiveActivity::Active)];
    assert_eq!(
        full_view(&next_presence(&mut alice).await),
        expect_full(Availability::Available, None, &active)
    );
    assert_eq!(bob.recv().await, public(ALICE, Availability::Available));

    // Nothing else was worth telling.
    alice.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn public_view_changes_only_when_availability_changes() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    // unknown → active: still available to bob, so no event; then a real change.
    publish(&mut alice, Activity::Active, None).await;
    publish(&mut alice, Activity::Away, None).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Away));
}

#[tokio::test]
async fn most_active_endpoint_follows_active_inactive_unknown_away_then_last_input() {
    let node = start_node(|_| {});
    let mut a = Vec::new();
    for device in ["d1", "d2", "d3", "d4"] {
        a.push(sign_in(node.addr, ALICE, device).await);
    }
    let ids: Vec<String> = a.iter().map(|r| r.endpoint.clone()).collect();
    let mut w = sign_in(node.addr, BOB, "watcher").await;
    subscribe(&mut w, &[ALICE]).await;
    // a[0] watches its own user.
    let first = subscribe(&mut a[0], &[ALICE]).await;
    // All unknown: ties break on the endpoint id, ascending bytes.
    let mut by_id: Vec<usize> = (0..4).collect();
    by_id.sort_by(|x, y| ids[*x].as_bytes().cmp(ids[*y].as_bytes()));
    let devices = ["d1", "d2", "d3", "d4"];
    let unknown: Vec<_> = by_id
        .iter()
        .map(|i| (ids[*i].as_str(), devices[*i], EffectiveActivity::Unknown))
        .collect();
    assert_eq!(
        full_view(&first[0]),
        expect_full(Availability::Available, None, &unknown)
    );

    // d4 away: unknown beats away.
    publish(&mut a[3], Activity::Away, None).await;
    let rest: Vec<_> = by_id
        .iter()
        .filter(|i| **i != 3)
        .map(|i| (ids[*i].as_str(), devices[*i], EffectiveActivity::Unknown))
        .collect();
    let mut want = rest.clone();
    want.push((ids[3].as_str(), "d4", EffectiveActivity::Away));
    let got = next_presence(&mut a[0]).await;
    assert_eq!(
        full_view(&got),
        expect_full(Availability::Available, None, &want)
    );

    // d3 inactive: inactive beats unknown; availability follows the most active endpoint.
    publish(&mut a[2], Activity::Inactive, None).await;
    let unknown12: Vec<_> = by_id
        .iter()
        .filter(|i| **i < 2)
        .map(|i| (ids[*i].as_str(), devices[*i], EffectiveActivity::Unknown))
        .collect();
    let mut want = vec![(ids[2].as_str(), "d3", EffectiveActivity::Inactive)];
    want.extend(unknown12.iter().cloned());
    want.push((ids[3].as_str(), "d4", EffectiveActivity::Away));
    let got = next_presence(&mut a[0]).await;
    assert_eq!(
        full_view(&got),
        expect_full(Availability::Inactive, None, &want)
    );
    assert_eq!(w.recv().await, public(ALICE, Availability::Inactive));

    // d2 active (idle 10 s): active beats inactive.
    publish(&mut a[1], Activity::Active, Some(10_000)).await;
    let got = next_presence(&mut a[0]).await;
    assert_eq!(
        full_view(&got),
        expect_full(
            Availability::Available,
            None,
            &[
                (ids[1].as_str(), "d2", EffectiveActivity::Active),
                (ids[2].as_str(), "d3", EffectiveActivity::Inactive),
                (ids[0].as_str(), "d1", EffectiveActivity::Unknown),
                (ids[3].as_str(), "d4", EffectiveActivity::Away),
            ]
        )
    );
    assert_eq!(w.recv().await, public(ALICE, Availability::Available));

    // d1 active but idle longer (60 s): the latest last input (d2) stays first.
    publish(&mut a[0], Activity::Active, Some(60_000)).await;
    let got = next_presence(&mut a[0]).await;
    assert_eq!(
        full_view(&got),
        expect_full(
            Availability::Available,
            None,
            &[
                (ids[1].as_str(), "d2", EffectiveActivity::Active),
                (ids[0].as_str(), "d1", EffectiveActivity::Active),
                (ids[2].as_str(), "d3", EffectiveActivity::Inactive),
                (ids[3].as_str(), "d4", EffectiveActivity::Away),
            ]
        )
    );

    // d1 active with fresh input: now its last input is the latest.
    publish(&mut a[0], Activity::Active, Some(0)).await;
    let got = next_presence(&mut a[0]).await;
    assert_eq!(
        full_view(&got),
        expect_full(
            Availability::Available,
            None,
            &[
                (ids[0].as_str(), "d1", EffectiveActivity::Active),
                (ids[1].as_str(), "d2", EffectiveActivity::Active),
                (ids[2].as_str(), "d3", EffectiveActivity::Inactive),
                (ids[3].as_str(), "d4", EffectiveActivity::Away),
            ]
        )
    );
    // None of the re-rankings changed what bob sees.
    w.expect_silence(QUIET).await;
}

#[tokio::test]
async fn idle_time_is_extrapolated_and_crossing_thresholds_is_notified_by_itself() {
    let node = start_node(|s| {
        s.presence.inactive_after_ms = 200;
        s.presence.away_after_ms = 400;
    });
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let alice_id = alice.endpoint.clone();
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    subscribe(&mut alice, &[ALICE]).await;

    let t0 = Instant::now();
    publish(&mut alice, Activity::Active, Some(150)).await;
    let active = [(alice_id.as_str(), "laptop", EffectiveActivity::Active)];
    let got = next_presence(&mut alice).await;
    assert_eq!(
        full_view(&got),
        expect_full(Availability::Available, None, &active)
    );

    // 50 ms later the last input is older than inactive_after: nobody published anything.
    assert_eq!(bob.recv().await, public(ALICE, Availability::Inactive));
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    let got = next_presence(&mut alice).await;
    let inactive = [(alice_id.as_str(), "laptop", EffectiveActivity::Inactive)];
    assert_eq!(
        full_view(&got),
        expect_full(Availability::Inactive, None, &inactive)
    );
    let ServerMsg::Presence {
        endpoints: Some(eps),
        ..
    } = &got
    else {
        unreachable!()
    };
    assert!(eps[0].idle_ms.expect("published") >= 200, "{got:?}");

    // And older than away_after 250 ms after that.
    assert_eq!(bob.recv().await, public(ALICE, Availability::Away));
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let away = [(alice_id.as_str(), "laptop", EffectiveActivity::Away)];
    assert_eq!(
        full_view(&next_presence(&mut alice).await),
        expect_full(Availability::Away, None, &away)
    );
}

#[tokio::test]
async fn a_watcher_who_subscribes_after_the_publication_still_hears_the_next_crossing() {
    // Nobody watches Alice when she publishes, so presence keeps no timer for her then; the
    // subscription must arm it.
    let node = start_node(|s| {
        s.presence.inactive_after_ms = 1_000;
        s.presence.away_after_ms = 10_000;
    });
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    // The endpoint tells presence in the same turn as it queues the `ok`, and Bob subscribes
    // only after the `ok`: the shard handles the publication first.
    request_ok(
        &mut alice,
        ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Active,
            idle_ms: Some(0),
        },
    )
    .await;
    let first = subscribe(&mut bob, &[ALICE]).await;
    assert_eq!(first, vec![public(ALICE, Availability::Available)]);
    assert_eq!(bob.recv().await, public(ALICE, Availability::Inactive));
}

#[tokio::test]
async fn published_idle_older_than_inactive_after_is_inactive_at_once() {
    let node = start_node(|s| {
        s.presence.inactive_after_ms = 10_000;
        s.presence.away_after_ms = 20_000;
    });
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    publish(&mut alice, Activity::Active, Some(15_000)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Inactive));
    publish(&mut alice, Activity::Active, Some(25_000)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Away));
    publish(&mut alice, Activity::Active, Some(0)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Available));
}

#[tokio::test]
async fn busy_with_inactive_or_away_most_active_endpoint_is_busy_inactive() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    let rid = alice.rid();
    alice
        .send(&ClientMsg::SetStatus {
            rid,
            status: Some(Status::Busy),
        })
        .await;
    assert_eq!(alice.recv().await, ServerMsg::Ok { rid });
    assert_eq!(bob.recv().await, public(ALICE, Availability::Busy));
    publish(&mut alice, Activity::Inactive, None).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::BusyInactive));
    publish(&mut alice, Activity::Away, None).await;
    // Away is still busy_inactive: no change for bob. Then active again: busy.
    publish(&mut alice, Activity::Active, None).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Busy));
}

#[tokio::test]
async fn manual_status_wins_over_activity() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    publish(&mut alice, Activity::Away, None).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Away));
    for (status, availability) in [
        (Status::DoNotDisturb, Availability::DoNotDisturb),
        (Status::BeRightBack, Availability::BeRightBack),
        (Status::Available, Availability::Available),
        (Status::Busy, Availability::BusyInactive),
        (Status::Away, Availability::Away),
    ] {
        set_status(&mut alice, Some(status)).await;
        assert_eq!(bob.recv().await, public(ALICE, availability));
    }
}

#[tokio::test]
async fn latest_set_status_from_any_endpoint_of_the_user_replaces_it() {
    let node = start_node(|_| {});
    let mut phone = sign_in(node.addr, ALICE, "phone").await;
    let mut laptop = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    set_status(&mut phone, Some(Status::Busy)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Busy));
    set_status(&mut laptop, Some(Status::DoNotDisturb)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::DoNotDisturb));
    // The same user's view carries the status itself.
    let own = subscribe(&mut phone, &[ALICE]).await;
    let (availability, _, status, _) = full_view(&own[0]);
    assert_eq!(
        (availability, status),
        (Availability::DoNotDisturb, Some(Some(Status::DoNotDisturb)))
    );
}

#[tokio::test]
async fn appear_offline_shows_offline_to_everyone() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let alice_id = alice.endpoint.clone();
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    subscribe(&mut alice, &[ALICE]).await;
    set_status(&mut alice, Some(Status::AppearOffline)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Offline));
    let unknown = [(alice_id.as_str(), "laptop", EffectiveActivity::Unknown)];
    assert_eq!(
        full_view(&next_presence(&mut alice).await),
        expect_full(Availability::Offline, Some(Status::AppearOffline), &unknown)
    );
    // Activity does not show through.
    publish(&mut alice, Activity::Inactive, None).await;
    let inactive = [(alice_id.as_str(), "laptop", EffectiveActivity::Inactive)];
    assert_eq!(
        full_view(&next_presence(&mut alice).await),
        expect_full(
            Availability::Offline,
            Some(Status::AppearOffline),
            &inactive
        )
    );
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn null_status_clears_the_manual_status() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    set_status(&mut alice, Some(Status::Busy)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Busy));
    set_status(&mut alice, None).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Available));
    let own = subscribe(&mut alice, &[ALICE]).await;
    assert_eq!(full_view(&own[0]).2, Some(None));
}

#[tokio::test]
async fn manual_status_is_cleared_when_the_last_endpoint_signs_out() {
    let node = start_node(|_| {});
    let mut phone = sign_in(node.addr, ALICE, "phone").await;
    let mut laptop = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    set_status(&mut phone, Some(Status::DoNotDisturb)).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::DoNotDisturb));

    // One endpoint left: the status stays.
    phone.send(&ClientMsg::Bye { rid: None }).await;
    phone.expect_closed().await;
    // The last one goes: offline, and the status is gone.
    laptop.send(&ClientMsg::Bye { rid: None }).await;
    laptop.expect_closed().await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Offline));
    let _again = sign_in(node.addr, ALICE, "laptop").await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Available));
}

#[tokio::test]
async fn unsubscribe_stops_events() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    let mut carol = sign_in(node.addr, CAROL, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    subscribe(&mut carol, &[ALICE]).await;
    let rid = bob.rid();
    bob.send(&ClientMsg::Unsubscribe {
        rid,
        users: vec![ALICE.to_owned()],
    })
    .await;
    assert_eq!(bob.recv().await, ServerMsg::Ok { rid });
    publish(&mut alice, Activity::Away, None).await;
    // Carol, still subscribed, hears of it: the change has been notified by now.
    assert_eq!(carol.recv().await, public(ALICE, Availability::Away));
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn signing_out_makes_the_user_offline_to_watchers() {
    let node = start_node(|_| {});
    let mut alice = sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    subscribe(&mut bob, &[ALICE]).await;
    alice.send(&ClientMsg::Bye { rid: None }).await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Offline));
    // A lost connection too.
    let alice = sign_in(node.addr, ALICE, "laptop").await;
    assert_eq!(bob.recv().await, public(ALICE, Availability::Available));
    drop(alice);
    assert_eq!(bob.recv().await, public(ALICE, Availability::Offline));
}

#[tokio::test]
async fn signing_out_one_of_two_endpoints_updates_the_same_users_view() {
    let node = start_node(|_| {});
    let mut laptop = sign_in(node.addr, ALICE, "laptop").await;
    let laptop_id = laptop.endpoint.clone();
    let mut phone = sign_in(node.addr, ALICE, "phone").await;
    // Once the ok is back, the publication is on its way to presence ahead of the subscription.
    publish(&mut phone, Activity::Active, None).await;
    assert!(matches!(phone.recv().await, ServerMsg::Ok { .. }));
    let own = subscribe(&mut laptop, &[ALICE]).await;
    assert_eq!(
        full_view(&own[0]),
        expect_full(
            Availability::Available,
            None,
            &[
                (phone.endpoint.as_str(), "phone", EffectiveActivity::Active),
                (laptop_id.as_str(), "laptop", EffectiveActivity::Unknown),
            ]
        )
    );
    phone.send(&ClientMsg::Bye { rid: None }).await;
    let unknown = [(laptop_id.as_str(), "laptop", EffectiveActivity::Unknown)];
    assert_eq!(
        full_view(&next_presence(&mut laptop).await),
        expect_full(Availability::Available, None, &unknown)
    );
}

#[tokio::test]
async fn an_endpoint_counts_in_presence_as_soon_as_it_is_welcomed() {
    let node = start_node(|_| {});
    let mut keep = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..25 {
        let user = format!("sip:user{i}@example.com");
        let mut watcher = sign_in(node.addr, &format!("sip:watcher{i}@example.com"), "desk").await;
        // Another user's watcher subscribing right after the welcome sees the user signed in.
        let mut laptop = Raw::sign_in(node.addr, &user, "laptop").await;
        let got = subscribe(&mut watcher, &[&user]).await;
        if got != vec![public(&user, Availability::Available)] {
            wrong.push(got);
        }
        // The same user's other endpoint sees both endpoints.
        let phone = Raw::sign_in(node.addr, &user, "phone").await;
        let got = subscribe(&mut laptop, &[&user]).await;
        let ServerMsg::Presence {
            endpoints: Some(eps),
            ..
        } = &got[0]
        else {
            panic!("expected the full view: {got:?}")
        };
        if eps.len() != 2 {
            wrong.push(got);
        }
        keep.push((watcher, laptop, phone));
    }
    assert!(
        wrong.is_empty(),
        "{} of 50 subscriptions right after a welcome missed the new endpoint: {wrong:?}",
        wrong.len()
    );
}

#[tokio::test]
async fn bye_updates_presence_before_the_connection_closes() {
    let node = start_node(|_| {});
    let mut bob = sign_in(node.addr, BOB, "desk").await;
    for i in 0..5 {
        let user = format!("sip:user{i}@example.com");
        let mut c = sign_in(node.addr, &user, "laptop").await;
        c.send(&ClientMsg::Bye { rid: None }).await;
        c.expect_closed().await;
        assert_eq!(
            subscribe(&mut bob, &[&user]).await,
            vec![public(&user, Availability::Offline)]
        );
    }
}
