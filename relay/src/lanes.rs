//! How a batch is published: as lanes. A lane's messages reach JetStream one after another, each
//! confirmed before the next is sent; the lanes of a batch go out side by side.
//!
//! An unordered route gives every message a lane of its own. An ordered route gives each group its
//! own lane and puts the ungrouped messages in one lane, in read order, so they keep the queue's
//! order as before groups existed. bussig hands out at most one message of a group at a time and
//! the relay acks it only after JetStream confirmed it, so a group keeps its order on any route.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::bus::Delivery;
use crate::publish::Outgoing;

/// What to do when JetStream rejects a lane's front message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRejection {
    /// Nack it with the queue's backoff: nothing behind it in the queue has to wait for it (an
    /// unordered route), or bussig itself holds its group back until it is settled.
    Nack,
    /// Retry it here, in place, with the queue's backoff: a nack would put it behind later ungrouped
    /// messages of an ordered route.
    RetryInPlace,
}

pub struct Lane {
    pub messages: VecDeque<(Delivery, Outgoing)>,
    pub on_rejection: OnRejection,
    /// JetStream's rejections of the front message so far in this batch (in-place retries).
    pub rejections: i32,
    /// "No responders" for the front message in a row: held that many times before it counts as a
    /// rejection.
    pub no_responders: u32,
    /// When the front message may be sent (again).
    pub due: Instant,
}

impl Lane {
    fn new(on_rejection: OnRejection, now: Instant) -> Lane {
        Lane {
            messages: VecDeque::new(),
            on_rejection,
            rejections: 0,
            no_responders: 0,
            due: now,
        }
    }
}

/// An unordered route's batch: every message alone, all sent at once.
pub fn each_alone(batch: Vec<(Delivery, Outgoing)>) -> Vec<Lane> {
    let now = Instant::now();
    batch
        .into_iter()
        .map(|message| {
            let mut lane = Lane::new(OnRejection::Nack, now);
            lane.messages.push_back(message);
            lane
        })
        .collect()
}

/// An ordered route's batch: a lane per group, and one lane for the ungrouped messages, each in
/// read order.
pub fn by_group(batch: Vec<(Delivery, Outgoing)>) -> Vec<Lane> {
    let now = Instant::now();
    let mut ungrouped = Lane::new(OnRejection::RetryInPlace, now);
    let mut lanes: Vec<Lane> = Vec::new();
    let mut lane_of_group: HashMap<String, usize> = HashMap::new();
    for message in batch {
        let Some(group) = message.0.group_id.clone() else {
            ungrouped.messages.push_back(message);
            continue;
        };
        let index = *lane_of_group.entry(group).or_insert_with(|| {
            lanes.push(Lane::new(OnRejection::Nack, now));
            lanes.len() - 1
        });
        lanes[index].messages.push_back(message);
    }
    if !ungrouped.messages.is_empty() {
        lanes.push(ungrouped);
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn message(id: i64, group: Option<&str>) -> (Delivery, Outgoing) {
        let mut delivery = Delivery::new("q", id, Uuid::nil(), json!({}));
        delivery.group_id = group.map(str::to_string);
        let outgoing = crate::publish::build(&delivery, "q", Some("s".into()), "").unwrap();
        (delivery, outgoing)
    }

    fn ids(lane: &Lane) -> Vec<i64> {
        lane.messages.iter().map(|(d, _)| d.id).collect()
    }

    #[test]
    fn an_ordered_batch_has_a_lane_per_group_and_one_for_the_ungrouped() {
        let batch = vec![
            message(1, None),
            message(2, Some("a")),
            message(3, Some("b")),
            message(4, None),
            message(5, Some("a")),
        ];
        let lanes = by_group(batch);
        let shape: Vec<(Vec<i64>, OnRejection)> =
            lanes.iter().map(|l| (ids(l), l.on_rejection)).collect();
        assert_eq!(
            shape,
            [
                (vec![2, 5], OnRejection::Nack),
                (vec![3], OnRejection::Nack),
                (vec![1, 4], OnRejection::RetryInPlace),
            ]
        );
    }

    #[test]
    fn an_unordered_batch_has_a_lane_per_message() {
        let lanes = each_alone(vec![
            message(1, None),
            message(2, Some("a")),
            message(3, Some("a")),
        ]);
        let shape: Vec<Vec<i64>> = lanes.iter().map(ids).collect();
        assert_eq!(shape, [vec![1], vec![2], vec![3]]);
        assert!(lanes.iter().all(|l| l.on_rejection == OnRejection::Nack));
    }
}
