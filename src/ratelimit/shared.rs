//! Shared budgets: GCRA buckets in Redis, so every replica paces one upstream budget together.
//! Redis's clock decides (`TIME` inside the scripts), so replicas with skewed clocks agree.
//! The connection is the credential store's (one connection manager per process), and every
//! call is bounded by its timeout.

use std::sync::Arc;
use std::time::Duration;

use crate::credential::redis::RedisStore;
use crate::credential::store::StoreError;
use crate::label::Label;

/// GCRA admission on one key, with Redis's clock (so every replica agrees). Returns 0 to go
/// now, a positive wait in ms for a reservation, or a negative wait when refused.
/// ARGV: interval ms, tolerance ms, max wait ms.
const GCRA_ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, tolerance, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > max_wait then return -wait end
if wait < 0 then wait = 0 end
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now + tolerance + 60000)
return wait";

/// Move the bucket: `mode` 'hold' keeps everyone waiting `ms` (tat = max(tat, now + ms +
/// tolerance)); 'set' puts tat at now + `ms`; 'give' returns one interval (a waiter left).
const GCRA_ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode, ms, tolerance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if mode == 'hold' then
  tat = math.max(tat, now + ms + tolerance)
elseif mode == 'set' then
  tat = now + ms
else
  tat = math.max(now, tat - ms)
end
redis.call('SET', KEYS[1], tat, 'PX', math.max(tat - now, 0) + tolerance + 60000)
return tat - now";

/// How [`SharedBudget::adjust`] moves a bucket: `as_label` is `GCRA_ADJUST`'s mode argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Adjust {
    /// A waiter left: return one interval.
    Give,
    /// The upstream said stop: everyone waits at least this long.
    Hold,
    /// The upstream said how much is used: the bucket is put there.
    Set,
}

/// The Redis side of shared budgets.
#[derive(Clone)]
pub struct SharedBudget {
    redis: Arc<RedisStore>,
}

impl SharedBudget {
    pub fn new(redis: Arc<RedisStore>) -> Self {
        Self { redis }
    }

    /// A shared GCRA admission (see `GCRA_ADMIT`).
    pub async fn admit(
        &self,
        key: &str,
        interval: Duration,
        tolerance: Duration,
        max_wait: Duration,
    ) -> Result<i64, StoreError> {
        let mut conn = self.redis.conn()?;
        let script = redis::Script::new(GCRA_ADMIT);
        let mut invocation = script.key(key);
        invocation
            .arg(interval.as_millis() as u64)
            .arg(tolerance.as_millis() as u64)
            .arg(max_wait.as_millis() as u64);
        self.redis.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// A shared bucket adjustment (see `GCRA_ADJUST`).
    pub async fn adjust(
        &self,
        key: &str,
        mode: Adjust,
        ms: u64,
        tolerance: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.redis.conn()?;
        let script = redis::Script::new(GCRA_ADJUST);
        let mut invocation = script.key(key);
        invocation
            .arg(mode.as_label())
            .arg(ms)
            .arg(tolerance.as_millis() as u64);
        self.redis
            .bounded(invocation.invoke_async::<i64>(&mut conn))
            .await?;
        Ok(())
    }
}
