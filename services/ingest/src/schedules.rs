//! Schedules' states folded from their logs, kept between uses (the scheduler's ticks, ingest's
//! commands) so that each reads only the events appended since.

use std::sync::Arc;

use taskmesh_bus::{Bus, BusError};
use taskmesh_events::schedule::{ScheduleSpec, ScheduleState};
use uuid::Uuid;

/// About how many bytes a held state takes (for [`Folded`]'s bound): its specs' JSON (the
/// spec its last tick was decided with counted only when a change since made it another).
fn size_of(state: &ScheduleState) -> usize {
    let json = |spec: &ScheduleSpec| serde_json::to_vec(spec).map_or(0, |j| j.len());
    let tick_spec = if Arc::ptr_eq(&state.tick_spec, &state.spec) { 0 } else { json(&state.tick_spec) };
    json(&state.spec) + tick_spec + std::mem::size_of::<ScheduleState>()
}

/// Most schedules whose folded state a scheduler or ingest keeps between uses.
const FOLDED_SCHEDULES: usize = 10_000;
/// Most bytes of folded states (their specs' JSON, roughly: an inline workflow can be large) a
/// scheduler or ingest keeps between uses.
const FOLDED_BYTES: usize = 64 << 20;

/// Schedules' states as this process last folded them, so that a tick (the scheduler's) or a
/// command (ingest's) reads only the events after them (a schedule ticking every second has
/// 86,400 events a day; reading them all each time would make each use slower than the last).
/// Bounded by count ([`FOLDED_SCHEDULES`]) and by size ([`FOLDED_BYTES`]): when full, a
/// schedule not yet held takes the place of arbitrary ones, and a schedule not held is read
/// whole (so beyond the bounds, some uses read whole logs). The log stays the truth: what is
/// held is a fold of a prefix of it, and each use folds the rest, whoever appended it.
#[derive(Default)]
pub struct Folded(std::sync::Mutex<Held>);

/// What [`Folded`] holds, and the sum of its states' sizes.
#[derive(Default)]
struct Held {
    /// Each state with about how many bytes it takes ([`size_of`] its spec).
    states: std::collections::HashMap<(String, Uuid), (ScheduleState, usize)>,
    bytes: usize,
}

impl Held {
    fn remove(&mut self, key: &(String, Uuid)) -> Option<(ScheduleState, usize)> {
        let old = self.states.remove(key)?;
        self.bytes -= old.1;
        Some(old)
    }
}

/// A schedule as [`Folded::load`] found it.
pub struct Loaded {
    /// `None`: no such schedule (never created, or deleted).
    pub state: Option<ScheduleState>,
    /// The sequence of the subject's last event (0: it has none), to append after.
    pub last_seq: u64,
}

impl Folded {
    /// The schedule's state now: the one held, with the events appended since folded onto it
    /// (all of them, when none is held); held again for the next use.
    pub async fn load(&self, bus: &Bus, tenant: &str, id: Uuid) -> Result<Loaded, BusError> {
        let subject = bus.namespace().schedule(tenant, id);
        let mut known = self.get(tenant, id);
        let mut after = known.as_ref().map_or(0, |s| s.last_seq);
        let (mut events, last) = bus.read_subject_to_last(&subject, after).await?;
        // The log behind what is held (the stream restored or made again while this process
        // ran): the held state is forgotten and the log read whole.
        if last < after {
            (known, after) = (None, 0);
            events = bus.read_subject(&subject, 0).await?;
        }
        let last_seq = events.last().map_or(after, |e| e.seq);
        let state = ScheduleState::fold(known, events.iter().map(|e| (e.seq, &e.envelope)));
        self.put(tenant, id, state.as_ref());
        Ok(Loaded { state, last_seq })
    }
    pub(crate) fn get(&self, tenant: &str, id: Uuid) -> Option<ScheduleState> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.states.get(&(tenant.to_string(), id)).map(|(state, _)| state.clone())
    }

    pub(crate) fn put(&self, tenant: &str, id: Uuid, state: Option<&ScheduleState>) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_string(), id);
        let old = held.remove(&key);
        let Some(state) = state else { return };
        // Sized again only when its specs changed.
        let size = match old {
            Some((old, size))
                if Arc::ptr_eq(&old.spec, &state.spec) && Arc::ptr_eq(&old.tick_spec, &state.tick_spec) =>
            {
                size
            }
            _ => size_of(state),
        };
        Self::hold(&mut held, key, state, size);
    }

    fn hold(held: &mut Held, key: (String, Uuid), state: &ScheduleState, size: usize) {
        // One bigger than the whole bound is never held.
        if size > FOLDED_BYTES {
            return;
        }
        while held.states.len() >= FOLDED_SCHEDULES || held.bytes + size > FOLDED_BYTES {
            let Some(other) = held.states.keys().next().cloned() else { break };
            held.remove(&other);
        }
        held.bytes += size;
        held.states.insert(key, (state.clone(), size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folded_states_stay_within_their_count_and_their_bytes() {
        let spec: ScheduleSpec =
            serde_json::from_value(serde_json::json!({"cron": "* * * * *", "workflow": "w"})).unwrap();
        let state = ScheduleState::new(spec.clone(), None, 1);
        let folded = Folded::default();
        let hold = |id: Uuid, size: usize| {
            let mut held = folded.0.lock().unwrap();
            held.remove(&("t".to_string(), id));
            Folded::hold(&mut held, ("t".to_string(), id), &state, size);
        };
        let bytes = || folded.0.lock().unwrap().bytes;
        let count = || folded.0.lock().unwrap().states.len();
        // By bytes: three of a third of the bound fit; a fourth takes one's place.
        let third = FOLDED_BYTES / 3;
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            hold(*id, third);
            assert!(bytes() <= FOLDED_BYTES);
        }
        assert_eq!((count(), bytes()), (3, 3 * third));
        assert!(folded.get("t", ids[3]).is_some(), "the newest is held");
        // Put again, a state is counted once; taken out, it is no longer counted.
        hold(ids[3], 10);
        assert_eq!((count(), bytes()), (3, 2 * third + 10));
        folded.put("t", ids[3], None);
        assert_eq!((count(), bytes()), (2, 2 * third));
        // One bigger than the whole bound is not held, and leaves the others be.
        hold(ids[3], FOLDED_BYTES + 1);
        assert_eq!((count(), bytes()), (2, 2 * third));
        // Put back after a tick, a state keeps its size while its spec is the one it had; a
        // changed spec is sized again.
        let size_held = |id: Uuid| folded.0.lock().unwrap().states[&("t".to_string(), id)].1;
        hold(ids[0], 7);
        folded.put("t", ids[0], Some(&state));
        assert_eq!(size_held(ids[0]), 7);
        let changed = ScheduleState { spec: Arc::new(spec.clone()), ..state.clone() };
        folded.put("t", ids[0], Some(&changed));
        // Two specs now: the changed one, and the one the last tick was decided with.
        let both = 2 * serde_json::to_vec(&spec).unwrap().len() + std::mem::size_of::<ScheduleState>();
        assert_eq!((size_held(ids[0]), size_of(&changed)), (both, both));
        let ticked = ScheduleState { tick_spec: changed.spec.clone(), ..changed.clone() };
        folded.put("t", ids[0], Some(&ticked));
        assert_eq!(size_held(ids[0]), both - serde_json::to_vec(&spec).unwrap().len(), "one spec after a tick");
        // By count.
        for _ in 0..FOLDED_SCHEDULES + 5 {
            hold(Uuid::now_v7(), 1);
        }
        assert_eq!(count(), FOLDED_SCHEDULES);
        let held = folded.0.lock().unwrap();
        assert_eq!(held.bytes, held.states.values().map(|(_, size)| size).sum::<usize>());
    }
}
