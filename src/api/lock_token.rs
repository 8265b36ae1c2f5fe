//! Lock tokens come from a ChaCha stream that each backend seeds once from the server's strong random
//! source. `gen_random_uuid` asks OpenSSL for every token: 6% of a backend running a read-and-ack loop.
use pgrx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    // Seeded on first use, so never in the postmaster: forked backends would share its stream.
    static GENERATOR: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// A new lock token: a random (version 4) UUID.
#[pg_extern(volatile, parallel_unsafe)]
fn lock_token() -> pgrx::Uuid {
    let mut bytes = [0u8; 16];
    GENERATOR
        .with_borrow_mut(|generator| generator.get_or_insert_with(seeded).fill_bytes(&mut bytes));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    pgrx::Uuid::from_bytes(bytes)
}

fn seeded() -> StdRng {
    let mut seed = [0u8; 32];
    if !crate::pg::strong_random(&mut seed) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "could not generate random values for lock tokens"
        );
    }
    StdRng::from_seed(seed)
}
