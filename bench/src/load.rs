//! Closed-loop clients: each on its own connection, all starting together, for a fixed time.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::pg::{connect, millis, Res, Samples};
use crate::systems::Step;

/// What one client did: messages moved, for how long, each step's time, whether it ran dry.
type ClientResult = (u64, Duration, Vec<f64>, bool);

pub struct Outcome {
    pub messages: u64,
    pub seconds: f64,
    /// Time of each step (one round trip or transaction pair), in milliseconds.
    pub steps: Samples,
    /// A consumer found the queue empty before its time was up.
    pub drained: bool,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    /// Runs of the same measurement taken in turns (see `in_turns`), as one.
    fn combine(parts: Vec<Outcome>) -> Outcome {
        Outcome {
            messages: parts.iter().map(|part| part.messages).sum(),
            seconds: parts.iter().map(|part| part.seconds).sum(),
            drained: parts.iter().any(|part| part.drained),
            steps: Samples::merge(parts.into_iter().map(|part| part.steps)),
        }
    }
}

/// What `closed_loop` runs: a step for each client connection.
pub type Setup<'a> = Box<dyn Fn(&mut Client, usize) -> Res<Step> + Sync + 'a>;

/// Turns a measurement is cut into. The machine drifts over a minute (its neighbours, the page
/// cache, the CPU clock): taken in rotation, the systems compared in one row meet the same drift
/// instead of whichever ran while it lasted.
const TURNS: u32 = 4;

/// Runs each of `setups` for `duration` in all, in `TURNS` turns taken in rotation; one outcome per
/// setup, in order.
pub fn in_turns(
    url: &str,
    clients: usize,
    duration: Duration,
    setups: &[Setup<'_>],
) -> Res<Vec<Outcome>> {
    let mut parts: Vec<Vec<Outcome>> = setups.iter().map(|_| Vec::new()).collect();
    for _ in 0..TURNS {
        for (setup, part) in setups.iter().zip(&mut parts) {
            part.push(closed_loop(
                url,
                clients,
                duration / TURNS,
                false,
                |client, index| setup(client, index),
            )?);
        }
    }
    Ok(parts.into_iter().map(Outcome::combine).collect())
}

/// Runs `clients` connections for `duration`, each repeating the step `setup` made for it.
/// With `stop_when_idle`, a client stops at its first step that moved nothing (a drained queue).
pub fn closed_loop<S>(
    url: &str,
    clients: usize,
    duration: Duration,
    stop_when_idle: bool,
    setup: S,
) -> Res<Outcome>
where
    S: Fn(&mut Client, usize) -> Res<Step> + Sync,
{
    let start_line = Barrier::new(clients);
    let warmed_up = Barrier::new(clients);
    // Caches, plans and connections settle before the clock starts; a consumer of a pre-filled queue
    // starts at once, as the fill has warmed the caches and a warm-up would eat into the backlog.
    let warmup = if stop_when_idle {
        Duration::ZERO
    } else {
        (duration / 5).min(Duration::from_secs(2))
    };
    let results: Vec<Res<ClientResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|index| {
                let setup = &setup;
                let (start_line, warmed_up) = (&start_line, &warmed_up);
                scope.spawn(move || -> Res<ClientResult> {
                    let prepared = connect(url)
                        .and_then(|mut client| Ok((setup(&mut client, index)?, client)));
                    // Everyone meets at the start line, even a client that failed, so nobody waits forever.
                    start_line.wait();
                    let warm = prepared.and_then(|(mut step, mut client)| {
                        let until = Instant::now() + warmup;
                        while Instant::now() < until {
                            if step(&mut client)? == 0 && stop_when_idle {
                                break;
                            }
                        }
                        Ok((step, client))
                    });
                    warmed_up.wait();
                    let (mut step, mut client) = warm?;
                    let start = Instant::now();
                    let deadline = start + duration;
                    let (mut messages, mut steps, mut drained) = (0u64, Vec::new(), false);
                    while Instant::now() < deadline {
                        let before = Instant::now();
                        let moved = step(&mut client)?;
                        steps.push(millis(before.elapsed()));
                        if moved == 0 && stop_when_idle {
                            drained = true;
                            break;
                        }
                        messages += moved;
                    }
                    Ok((messages, start.elapsed(), steps, drained))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let mut outcome = Outcome {
        messages: 0,
        seconds: 0.0,
        steps: Samples::default(),
        drained: false,
    };
    let mut all_steps = Vec::new();
    for result in results {
        let (messages, elapsed, steps, drained) = result?;
        outcome.messages += messages;
        // A drained client stops early; the rate is over the longest-running client.
        outcome.seconds = outcome.seconds.max(elapsed.as_secs_f64());
        all_steps.extend(steps);
        outcome.drained |= drained;
    }
    outcome.steps = Samples::new(all_steps);
    Ok(outcome)
}
