//! NCCL broadcast of flat weight buffers from the learner (rank 0) to GPU rollout workers, with the
//! unique id exchanged through the coordinator (`PublishNcclId` / `GetNcclId`).
//!
//! **Untested here.** This module is compiled only with the `cuda` feature and has never run in
//! this repository's CI or on a machine with two GPUs: NCCL refuses two ranks on one GPU, and the
//! development machines have at most one. The gRPC stream in this crate is the tested path; this
//! one follows cudarc 0.19.10's documented API (`shared/reference/rust-stack.md` §4).
//!
//! Protocol: the learner calls [`publish_rendezvous`] with the member list (itself first, as
//! rank 0) whenever the set of GPU workers changes; every member (learner included) then calls
//! [`NcclBroadcaster::join`] with that rendezvous, which blocks until all ranks have joined.
//! Members watch for a newer generation with [`await_rendezvous`] and rebuild when it appears.
//! A broadcast sends one flat buffer (all weights laid out back to back, bf16 or f32) in buckets
//! of hundreds of MB, never tensor by tensor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, NcclType};
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{GetNcclIdRequest, NcclRendezvous, PublishNcclIdRequest};
use medrl_proto::NCCL_UNIQUE_ID_LEN;

use crate::error::{Result, WeightSyncError};

/// Default bucket size: large enough to reach link bandwidth, small enough to bound staging.
pub const DEFAULT_BUCKET_BYTES: usize = 256 << 20;

/// The learner's name in member lists; it is always rank 0.
pub const LEARNER_MEMBER: &str = "learner";

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> WeightSyncError {
    WeightSyncError::Nccl(format!("{what}: {e:?}"))
}

/// One generation of the communicator: its unique id and members by rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    /// The raw `ncclUniqueId`.
    pub unique_id: [u8; NCCL_UNIQUE_ID_LEN],
    /// Increases with every publication.
    pub generation: u64,
    /// Ranks in the communicator.
    pub world_size: usize,
    /// `members[r]` is the member of rank r (the learner is rank 0).
    pub members: Vec<String>,
}

impl Rendezvous {
    /// Checks a rendezvous received from the coordinator.
    fn from_proto(r: NcclRendezvous) -> Result<Self> {
        let unique_id: [u8; NCCL_UNIQUE_ID_LEN] = r
            .unique_id
            .as_ref()
            .try_into()
            .map_err(|_| WeightSyncError::Nccl(format!("unique id of {} bytes, expected {NCCL_UNIQUE_ID_LEN}", r.unique_id.len())))?;
        let world_size = r.world_size as usize;
        if world_size == 0 || r.members.len() != world_size {
            return Err(WeightSyncError::Nccl(format!("{} members for world size {world_size}", r.members.len())));
        }
        Ok(Rendezvous { unique_id, generation: r.generation, world_size, members: r.members })
    }

    /// The rank of `member`, if it belongs to this generation.
    pub fn rank_of(&self, member: &str) -> Option<usize> {
        self.members.iter().position(|m| m == member)
    }
}

/// Learner side: makes a fresh unique id for `members` (learner first) and publishes it.
pub async fn publish_rendezvous(client: &mut CoordinatorClient<AuthedChannel>, members: Vec<String>) -> Result<Rendezvous> {
    if members.first().map(String::as_str) != Some(LEARNER_MEMBER) {
        return Err(WeightSyncError::Nccl(format!("members must start with {LEARNER_MEMBER:?} (rank 0)")));
    }
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    let mut unique_id = [0u8; NCCL_UNIQUE_ID_LEN];
    for (dst, src) in unique_id.iter_mut().zip(id.internal()) {
        // c_char is i8 here; the id is opaque bytes, so a bit-for-bit cast is what we want.
        *dst = *src as u8;
    }
    let world_size = members.len() as u32;
    let request = PublishNcclIdRequest { unique_id: Bytes::copy_from_slice(&unique_id), world_size, members: members.clone() };
    let generation = client.publish_nccl_id(request).await?.into_inner().generation;
    tracing::info!(generation, world_size, "NCCL rendezvous published");
    Ok(Rendezvous { unique_id, generation, world_size: members.len(), members })
}

/// Member side: waits (polling every `poll`) until a rendezvous of at least `min_generation`
/// exists, for at most `timeout`.
pub async fn await_rendezvous(
    client: &mut CoordinatorClient<AuthedChannel>,
    min_generation: u64,
    timeout: Duration,
    poll: Duration,
) -> Result<Rendezvous> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.get_nccl_id(GetNcclIdRequest { min_generation }).await {
            Ok(response) => return Rendezvous::from_proto(response.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound && Instant::now() + poll < deadline => {
                tokio::time::sleep(poll).await;
            }
            Err(status) if status.code() == tonic::Code::NotFound => return Err(WeightSyncError::Timeout(timeout)),
            Err(status) => return Err(status.into()),
        }
    }
}

/// A joined communicator that broadcasts flat buffers from rank 0.
///
/// A `Comm` is not `Send`: create and use the broadcaster on one thread (a dedicated weight
/// thread), never across `.await` points of a multi-threaded runtime.
pub struct NcclBroadcaster {
    comm: Comm,
    rendezvous: Rendezvous,
    bucket_bytes: usize,
}

impl NcclBroadcaster {
    /// Joins the communicator of `rendezvous` as `member` on `stream`; blocks until every rank
    /// has joined (`ncclCommInitRank`).
    pub fn join(stream: Arc<CudaStream>, rendezvous: Rendezvous, member: &str, bucket_bytes: usize) -> Result<Self> {
        let rank = rendezvous
            .rank_of(member)
            .ok_or_else(|| WeightSyncError::Nccl(format!("{member:?} is not a member of generation {}", rendezvous.generation)))?;
        let mut internal = [0 as core::ffi::c_char; NCCL_UNIQUE_ID_LEN];
        for (dst, src) in internal.iter_mut().zip(rendezvous.unique_id) {
            *dst = src as core::ffi::c_char;
        }
        let comm = Comm::from_rank(stream, rank, rendezvous.world_size, Id::uninit(internal)).map_err(|e| nccl_err("ncclCommInitRank", e))?;
        tracing::info!(rank, world_size = rendezvous.world_size, generation = rendezvous.generation, "joined NCCL communicator");
        Ok(NcclBroadcaster { comm, rendezvous, bucket_bytes: bucket_bytes.max(1) })
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The generation this communicator was built from.
    pub fn generation(&self) -> u64 {
        self.rendezvous.generation
    }

    /// True when `members` differs from this communicator's: it must be rebuilt.
    pub fn members_changed(&self, members: &[String]) -> bool {
        self.rendezvous.members != members
    }

    /// Broadcasts `buffer` from rank 0 in buckets: rank 0's contents overwrite every other rank's.
    /// Returns once the stream has finished, so the caller may apply the weights.
    pub fn broadcast<T: NcclType>(&self, buffer: &mut CudaSlice<T>) -> Result<()> {
        let per_bucket = (self.bucket_bytes / std::mem::size_of::<T>()).max(1);
        let total = buffer.len();
        let mut start = 0;
        while start < total {
            let end = total.min(start + per_bucket);
            let mut view = buffer.slice_mut(start..end);
            self.comm.broadcast_in_place(&mut view, 0).map_err(|e| nccl_err("ncclBroadcast", e))?;
            start = end;
        }
        self.comm.stream().synchronize().map_err(|e| nccl_err("stream synchronize", e))?;
        Ok(())
    }
}
