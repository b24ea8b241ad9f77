//! Places a gateway gives out for requests that stay open (live streams, reads waiting for a
//! run's end), bounded in all and per tenant, so one tenant cannot take them all.

use taskmesh_events::ErrorCode;
use taskmesh_http::ApiError;

/// The places of one kind a gateway gives out, counted in all and per tenant.
pub struct Places {
    /// What they are for, as the refusals name it ("live streams").
    what: &'static str,
    most: usize,
    most_per_tenant: usize,
    taken: std::sync::Mutex<(usize, std::collections::HashMap<String, usize>)>,
}

/// One place among a gateway's [`Places`], given back when dropped.
pub struct Place {
    places: std::sync::Arc<Places>,
    tenant: String,
}

impl Places {
    pub fn new(what: &'static str, most: usize, most_per_tenant: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { what, most, most_per_tenant, taken: Default::default() })
    }

    /// One more place for `tenant`: refused (`429`) when the tenant holds its share already,
    /// or (`503`) when the gateway gives out all it may.
    pub fn take(self: &std::sync::Arc<Self>, tenant: &str) -> Result<Place, ApiError> {
        let mut taken = self.taken.lock().expect("not poisoned");
        let (total, per_tenant) = &mut *taken;
        if *total >= self.most {
            let detail = format!("this gateway serves {} {} already; try again later", self.most, self.what);
            return Err(ApiError::new(ErrorCode::Unavailable, detail));
        }
        let n = per_tenant.entry(tenant.to_string()).or_default();
        if *n >= self.most_per_tenant {
            let detail = format!(
                "the tenant has {} {} on this gateway already, its most; try again once one has ended",
                self.most_per_tenant, self.what
            );
            return Err(ApiError::new(ErrorCode::RateLimited, detail));
        }
        *n += 1;
        *total += 1;
        Ok(Place { places: self.clone(), tenant: tenant.to_string() })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut taken = self.places.taken.lock().expect("not poisoned");
        let (total, per_tenant) = &mut *taken;
        *total -= 1;
        if let Some(n) = per_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                per_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_in_all_and_per_tenant_and_given_back() {
        let places = Places::new("live streams", 3, 2);
        let a1 = places.take("a").unwrap();
        let _a2 = places.take("a").unwrap();
        let refused = places.take("a").err().unwrap().0;
        assert_eq!((refused.status, refused.code), (429, ErrorCode::RateLimited), "the tenant's share");
        assert!(refused.detail.contains("2 live streams"), "{}", refused.detail);
        let _b1 = places.take("b").unwrap();
        let refused = places.take("c").err().unwrap().0;
        assert_eq!((refused.status, refused.code), (503, ErrorCode::Unavailable), "the gateway's");
        drop(a1);
        let _a3 = places.take("a").unwrap();
        assert!(places.take("b").is_err(), "full again");
    }
}
