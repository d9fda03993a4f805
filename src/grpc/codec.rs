//! The protobuf codec of every geomatch service: prost's, except that a request body
//! that is not a valid message is the caller's fault. prost's codec answers INTERNAL,
//! which an alert on server errors would page on; geomatch answers INVALID_ARGUMENT on
//! the field `request` (a `google.rpc.BadRequest` violation) and counts the refusal as
//! `geomatch_rejections_total{reason="request"}`.
//!
//! The generated clients use the same codec, so a client of this crate that received an
//! undecodable response would also see INVALID_ARGUMENT.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with undecodable messages answered INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct GeomatchCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GeomatchCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for GeomatchCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder, with a decode failure mapped to INVALID_ARGUMENT.
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U> std::fmt::Debug for RequestDecoder<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestDecoder")
    }
}

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's decoder fails only on a malformed message (an error of its own maps to
        // INTERNAL, which is all it returns).
        self.0.decode(buf).map_err(|status| {
            super::status::to_status(crate::error::Error::invalid(
                "request",
                format!("not a valid protobuf message: {}", status.message()),
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
