//! A token bucket per connection: `burst` frames at once, refilled at `rate` per second. Time is
//! tokio's, so tests can pause it.

use tokio::time::Instant;

pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(0.0),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// How long until a token is there (zero when one is); `None` when the bucket never refills.
    pub(crate) fn wait(&self) -> Option<std::time::Duration> {
        if self.tokens >= 1.0 {
            return Some(std::time::Duration::ZERO);
        }
        (self.rate > 0.0)
            .then(|| std::time::Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    /// Takes a token if one is there.
    pub(crate) fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let mut bucket = TokenBucket::new(2.0, 3);
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.take());
        assert_eq!(bucket.wait(), Some(Duration::from_millis(500)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(bucket.take());
        assert!(!bucket.take());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..10).filter(|_| bucket.take()).count(),
            3,
            "refill stops at the burst size"
        );
    }
}
