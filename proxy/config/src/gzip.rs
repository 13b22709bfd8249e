//! `proxy.json.gz`: one ordinary gzip member (RFC 1952), readable by any
//! gunzip, which a writer may build from parts compressed separately.
//!
//! A [`Deflated`] part is a raw deflate stream (RFC 1951) of some bytes,
//! ended with a sync flush and no final block: it stops on a byte boundary
//! and refers to nothing before its own start. Such parts therefore
//! concatenate into one deflate stream of the concatenated bytes. Framed
//! as [`GZIP_HEADER`] ‖ part₁ ‖ … ‖ partₙ ‖ [`gzip_trailer`] (which closes
//! the stream with an empty final block and carries the CRC-32 and length
//! combined from the parts' own), the result is a single gzip member. A
//! writer can thus compress each shared piece of many documents once.

use std::io::{Read, Write};

pub use flate2::Crc;
use flate2::{Compress, Compression, FlushCompress};

use crate::{LoadError, MAX_DECODED_BYTES};

/// Gzip-compresses config bytes for a ConfigMap's `binaryData`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(bytes).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Decompresses `proxy.json.gz` bytes, refusing more than [`MAX_DECODED_BYTES`].
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, LoadError> {
    // Sized up front from the length the trailer states (modulo 2³², and
    // not trusted beyond the limit), so a large config is not copied as
    // the buffer grows.
    let stated = bytes
        .last_chunk::<4>()
        .map_or(0, |t| u64::from(u32::from_le_bytes(*t)));
    let mut out = Vec::with_capacity(stated.min(MAX_DECODED_BYTES) as usize + 1);
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECODED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(LoadError::Gzip)?;
    if out.len() as u64 > MAX_DECODED_BYTES {
        return Err(LoadError::TooLarge);
    }
    Ok(out)
}

/// The start of a gzip member: magic, deflate, no flags, no time, no extra
/// flags, unknown OS.
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The end of a gzip member whose parts' CRCs were combined into `crc`: an
/// empty final deflate block (fixed Huffman: `BFINAL=1`, `BTYPE=01`, end of
/// block), the CRC-32 and the length modulo 2³², little-endian.
pub fn gzip_trailer(crc: &Crc) -> [u8; 10] {
    let mut t = [0u8; 10];
    t[0] = 0x03;
    t[1] = 0x00;
    t[2..6].copy_from_slice(&crc.sum().to_le_bytes());
    t[6..10].copy_from_slice(&crc.amount().to_le_bytes());
    t
}

/// Bytes compressed on their own into a part of a gzip member (see the
/// module documentation).
#[derive(Debug)]
pub struct Deflated {
    bytes: Vec<u8>,
    crc: Crc,
}

impl Deflated {
    /// Compresses the concatenation of `pieces` (at the best level, as
    /// [`gzip`] does).
    pub fn compress<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut c = Compress::new(Compression::best(), false);
        let mut crc = Crc::new();
        let mut out: Vec<u8> = Vec::new();
        for piece in pieces {
            crc.update(piece);
            let mut input = piece;
            while !input.is_empty() {
                reserve(&mut out, input.len() / 4);
                let before = c.total_in();
                c.compress_vec(input, &mut out, FlushCompress::None)
                    .expect("deflate into memory cannot fail");
                let used = usize::try_from(c.total_in() - before).expect("at most the input");
                input = &input[used..];
            }
        }
        // A sync flush ends the pending block and byte-aligns the stream
        // with an empty stored block; it is complete once output room is left.
        loop {
            reserve(&mut out, 0);
            c.compress_vec(&[], &mut out, FlushCompress::Sync)
                .expect("deflate into memory cannot fail");
            if out.len() < out.capacity() {
                break;
            }
        }
        out.shrink_to_fit();
        Self { bytes: out, crc }
    }

    /// The compressed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// CRC-32 and length of the uncompressed bytes, to combine with
    /// [`Crc::combine`] into the member's.
    pub fn crc(&self) -> &Crc {
        &self.crc
    }
}

fn reserve(out: &mut Vec<u8>, hint: usize) {
    let want = hint.clamp(256, 1 << 20);
    if out.capacity() - out.len() < want {
        out.reserve(want);
    }
}
