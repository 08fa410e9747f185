//! The limiter on tokio's paused clock: learning a limit, bucket scope, queue places.

use super::*;
use crate::label::Choice;
use http::HeaderName;

#[tokio::test]
async fn unlimited_until_a_limit_is_seen() {
    let limiter = Limiter::default();
    let rl = RateLimit::default();
    let key = bucket_key(&rl, "c", "w");
    let t0 = Instant::now();
    for _ in 0..1000 {
        assert!(matches!(
            limiter.admit(&key, &rl, "w", t0).await,
            Decision::Go
        ));
    }
    // Nothing to pace yet, so nothing kept per workspace either, and no lookups made.
    limiter.buckets.run_pending_tasks();
    assert_eq!(limiter.buckets.entry_count(), 0);
    assert!(limiter.taught.load().is_empty());
    let seen = Learned {
        limit: Some(5),
        remaining: Some(0),
        reset_after: Some(Duration::from_secs(10)),
        ..Learned::default()
    };
    limiter.observe(&key, &rl, &seen, false, t0).await;
    match limiter.admit(&key, &rl, "w", t0).await {
        Decision::Refuse(wait) => assert_eq!(wait, Duration::from_secs(10)),
        _ => panic!("held until the reset"),
    }
    // What one connector's API taught paces only that connector.
    let other = bucket_key(&rl, "d", "w");
    assert!(matches!(
        limiter.admit(&other, &rl, "w", t0).await,
        Decision::Go
    ));
    // A second workspace of the taught connector: looked up, nothing learned for it yet.
    let second = bucket_key(&rl, "c", "v");
    assert!(matches!(
        limiter.admit(&second, &rl, "v", t0).await,
        Decision::Go
    ));
}

#[tokio::test]
async fn per_application_buckets_are_shared_by_workspaces() {
    let rl = RateLimit {
        initial: Some((1, 0.001)),
        per_application: true,
        ..RateLimit::default()
    };
    let limiter = Limiter::default();
    let t0 = Instant::now();
    assert!(matches!(
        limiter
            .admit(&bucket_key(&rl, "c", "w1"), &rl, "w1", t0)
            .await,
        Decision::Go
    ));
    assert!(matches!(
        limiter
            .admit(&bucket_key(&rl, "c", "w2"), &rl, "w2", t0)
            .await,
        Decision::Refuse(_)
    ));
    let per_ws = RateLimit {
        per_application: false,
        ..rl
    };
    assert!(matches!(
        limiter
            .admit(&bucket_key(&per_ws, "c", "w3"), &per_ws, "w3", t0)
            .await,
        Decision::Go
    ));
}

#[tokio::test]
async fn a_dropped_ticket_frees_its_place() {
    let (limiter, rl, t0) = token_taken(1.0, Duration::from_secs(10), 1).await;
    let key = bucket_key(&rl, "c", "w");
    let Decision::Wait(ticket) = limiter.admit(&key, &rl, "w", t0).await else {
        panic!("queued")
    };
    assert!(
        matches!(limiter.admit(&key, &rl, "w", t0).await, Decision::Refuse(_)),
        "queue full"
    );
    assert_eq!(limiter.queued(), 1);
    drop(ticket);
    assert_eq!(limiter.queued(), 0);
    assert!(matches!(
        limiter.admit(&key, &rl, "w", t0).await,
        Decision::Wait(_)
    ));
}

/// After a stall of the thread, the waiters whose turns passed go one interval apart, not
/// all at once (one token at 1,000/s: a burst of 8 would be 8 upstream requests together).
#[tokio::test(start_paused = true)]
async fn waiters_whose_turns_passed_in_a_stall_go_one_interval_apart() {
    let (limiter, rl, t0) = token_taken(1000.0, Duration::from_secs(1), 64).await;
    let key = bucket_key(&rl, "c", "w");
    let mut tickets = Vec::new();
    for _ in 0..8 {
        let Decision::Wait(ticket) = limiter.admit(&key, &rl, "w", t0).await else {
            panic!("queued")
        };
        tickets.push(ticket);
    }
    // Nobody polls the waiters for 30 ms: their turns (1..=8 ms) all pass.
    tokio::time::advance(Duration::from_millis(30)).await;
    let released: Vec<_> = tickets
        .into_iter()
        .map(|mut ticket| {
            tokio::spawn(async move {
                ticket.turn().await.expect("within max_wait");
                ticket.used();
                Instant::now()
            })
        })
        .collect();
    let mut at = Vec::new();
    for r in released {
        at.push(r.await.unwrap() - t0);
    }
    at.sort();
    let ms = Duration::from_millis;
    // Two ticks of slack at the stall's end, then one every millisecond.
    assert_eq!(at, [30, 30, 30, 31, 32, 33, 34, 35].map(ms), "{at:?}");
    assert_eq!(limiter.queued(), 0);
}

/// Spacing the waiters out after a stall never holds one past its `max_wait`: the ones the
/// spacing would hold longer are refused when that shows (and give their slots back), as they
/// would have been at admission. Without the deadline the last three went at 53, 63 and 73 ms
/// against a 50 ms `max_wait`.
#[tokio::test(start_paused = true)]
async fn a_waiter_spaced_past_its_max_wait_is_refused() {
    let ms = Duration::from_millis;
    let (limiter, rl, t0) = token_taken(100.0, ms(50), 64).await;
    let key = bucket_key(&rl, "c", "w");
    let mut tickets = Vec::new();
    // Turns at 10, 20, 30, 40 and 50 ms: all within the 50 ms max_wait.
    for _ in 0..5 {
        let Decision::Wait(ticket) = limiter.admit(&key, &rl, "w", t0).await else {
            panic!("queued")
        };
        tickets.push(ticket);
    }
    assert!(matches!(
        limiter.admit(&key, &rl, "w", t0).await,
        Decision::Refuse(_)
    ));
    // A 35 ms stall: three turns passed.
    tokio::time::advance(ms(35)).await;
    let outcomes: Vec<_> = tickets
        .into_iter()
        .map(|mut ticket| {
            tokio::spawn(async move {
                let turn = ticket.turn().await;
                if turn.is_ok() {
                    ticket.used();
                }
                (Instant::now() - t0, turn.is_ok())
            })
        })
        .collect();
    let mut at = Vec::new();
    for o in outcomes {
        at.push(o.await.unwrap());
    }
    at.sort();
    // One goes at the stall's end and the next an interval later, at 43 ms; the two waiting
    // with it would go at 53 and 63 ms, so they are refused at 43, and the last when its own
    // turn (50 ms) shows it would go at 73.
    assert_eq!(
        at,
        [
            (ms(35), true),
            (ms(43), false),
            (ms(43), false),
            (ms(43), true),
            (ms(50), false)
        ],
        "{at:?}"
    );
    assert_eq!(limiter.queued(), 0);
    // The refused waiters' slots came back: the next request goes one interval after the
    // last one sent (43 ms), not behind the refused ones.
    let Decision::Wait(mut next) = limiter.admit(&key, &rl, "w", t0 + ms(50)).await else {
        panic!("queued")
    };
    next.turn().await.expect("within max_wait");
    assert_eq!(Instant::now() - t0, ms(53));
}

/// A 429 that holds the bucket holds the waiters already queued too: none is sent into the
/// hold. One the hold outlasts its `max_wait` is refused (Retry-After: the rest of the hold);
/// after a short hold they go, one interval apart. Before, both went at their turns (100 and
/// 200 ms), into the hold.
#[tokio::test(start_paused = true)]
async fn queued_waiters_are_not_sent_into_a_hold() {
    let ms = Duration::from_millis;
    let hold = |after: Duration| Learned {
        retry_after: Some(after),
        ..Learned::default()
    };
    let (limiter, rl, t0) = token_taken(10.0, ms(1000), 64).await;
    let key = bucket_key(&rl, "c", "w");
    let Decision::Wait(mut first) = limiter.admit(&key, &rl, "w", t0).await else {
        panic!("queued")
    };
    // The first request's answer: 429, Retry-After 2 s (past the waiter's 1 s max_wait).
    limiter.observe(&key, &rl, &hold(ms(2000)), true, t0).await;
    assert_eq!(first.turn().await, Err(ms(1900)), "refused at its turn");
    assert_eq!(Instant::now() - t0, ms(100));
    drop(first);

    // A short hold: waiters wait it out, then go one interval apart.
    let (limiter, rl, t0) = token_taken(10.0, ms(1000), 64).await;
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let Decision::Wait(ticket) = limiter.admit(&key, &rl, "w", t0).await else {
            panic!("queued")
        };
        waiters.push(ticket);
    }
    limiter.observe(&key, &rl, &hold(ms(300)), true, t0).await;
    let mut at = Vec::new();
    for mut ticket in waiters {
        ticket.turn().await.expect("the hold ends within max_wait");
        ticket.used();
        at.push(Instant::now() - t0);
    }
    assert_eq!(at, [ms(300), ms(400)]);
}

/// A limiter whose ("c", "w") bucket holds one token at `per_second`, that token taken.
async fn token_taken(
    per_second: f64,
    max_wait: Duration,
    queue_size: usize,
) -> (Limiter, RateLimit, Instant) {
    let rl = RateLimit {
        initial: Some((1, per_second)),
        max_wait,
        queue_size,
        ..RateLimit::default()
    };
    let limiter = Limiter::default();
    let t0 = Instant::now();
    assert!(matches!(
        limiter
            .admit(&bucket_key(&rl, "c", "w"), &rl, "w", t0)
            .await,
        Decision::Go
    ));
    (limiter, rl, t0)
}

#[test]
fn config_validation() {
    assert!(
        RateLimit::build(&RateLimitFile {
            capacity: Some(10),
            ..RateLimitFile::default()
        })
        .is_err()
    );
    assert!(
        RateLimit::build(&RateLimitFile {
            scope: Some(Choice::Unknown("galaxy".into())),
            ..RateLimitFile::default()
        })
        .is_err()
    );
    assert!(
        RateLimit::build(&RateLimitFile {
            reset_format: Some(Choice::Unknown("fortnights".into())),
            ..RateLimitFile::default()
        })
        .is_err()
    );
    let rl = RateLimit::build(&RateLimitFile {
        capacity: Some(40),
        per_second: Some(2.0),
        scope: Some(BucketScope::Application.into()),
        used_of_limit_header: Some("X-Shopify-Shop-Api-Call-Limit".into()),
        ..RateLimitFile::default()
    })
    .unwrap();
    assert_eq!(rl.initial, Some((40, 2.0)));
    assert!(rl.per_application);
    assert_eq!(
        rl.headers.used_of_limit.as_ref().map(HeaderName::as_str),
        Some("x-shopify-shop-api-call-limit")
    );
    let bad = RateLimit::build(&RateLimitFile {
        limit_header: Some("x limit".into()),
        ..RateLimitFile::default()
    })
    .unwrap_err();
    assert_eq!(bad[0].0, "limit_header");
}
