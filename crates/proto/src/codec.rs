//! The codec of every medrl service: prost's wire format, with an encoder that reserves a
//! message's whole encoded length before writing it.
//!
//! tonic's encode buffer starts at 8 KiB and, once the previous message is still on its way out,
//! regrows from 64 KiB by doubling while prost writes; each doubling copies what was written so
//! far. For a 4 MiB weight chunk that is six allocations and one more copy of the chunk, and the
//! fresh allocations cost page faults. Decoding is prost's own. Every test that makes a gRPC
//! call goes through this codec; the weight-stream tests compare blobs byte for byte.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// The codec the generated stubs use (`codec_path` in `build.rs`).
#[derive(Debug)]
pub struct ReservingCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for ReservingCodec<T, U> {
    fn default() -> Self {
        ReservingCodec(PhantomData)
    }
}

impl<T, U> Codec for ReservingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes a prost message into room reserved for all of it at once.
#[derive(Debug)]
pub struct ReservingEncoder<T>(PhantomData<fn() -> T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }
}
