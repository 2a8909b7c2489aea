//! Fuzzes the block decoder (`kvshelf::codec`) with arbitrary bytes, as read from Redis.
//!
//! Properties checked on every input:
//! - `decode_header`, `decode`, `Header::check` and the error's `Display`/`kind` never panic;
//! - a header that decodes is within the format's limits, and its bytes alone (what
//!   `GETRANGE key 0 4095` returns) decode to the same header;
//! - a block that decodes agrees with `decode_header`, has exactly `header.payload_len`
//!   payload bytes (a zero-copy slice of the input) with a matching checksum;
//! - re-encoding a decoded block with `codec::encode` and decoding it again gives the same
//!   header and payload.
//!
//! Unbounded allocation is caught by libFuzzer's `-rss_limit_mb` / `-malloc_limit_mb`.
#![no_main]

use bytes::Bytes;
use kvshelf::codec::{
    self, CodecError, HEADER_ALIGN, MAX_HEADER_LEN, MAX_PAYLOAD_LEN, PREAMBLE_LEN,
};
use kvshelf::{BlockHash, Dtype, Header, Layout, Namespace};
use libfuzzer_sys::fuzz_target;

/// The README's sample namespace (Qwen2.5-0.5B, bf16, 16-token blocks of 192 KiB).
fn sample_namespace() -> Namespace {
    Namespace {
        label: "qwen2.5-0.5b".into(),
        model_id: "Qwen/Qwen2.5-0.5B-Instruct".into(),
        model_revision: String::new(),
        kv_dtype: Dtype::Bfloat16,
        layout: Layout {
            num_layers: 24,
            num_kv_heads: 2,
            head_dim: 64,
            tp_size: 1,
            tp_rank: 0,
            order: "lkthd".into(),
        },
        block_size: 16,
        lora_adapter: None,
        ttl: None,
        max_pinned_bytes: None,
        hash_scheme: Default::default(),
    }
}

/// Uses an error the way callers do (log line, metric label); must not panic.
fn touch(e: &CodecError) {
    let _ = e.kind();
    let _ = e.to_string();
    let _ = format!("{e:?}");
}

/// `Header::check` must never panic, whatever the header says. Checked against the fixed
/// sample namespace and hash, and against variants that take the label and block hash from
/// the header so that the later comparisons (tokens, dtype, order, shape, length) run too.
fn check_header(header: &Header) {
    let ns = sample_namespace();
    let fixed = BlockHash([0x5a; 32]);
    for (ns, hash) in [
        (ns.clone(), fixed),
        (ns.clone(), header.block),
        (
            Namespace {
                label: header.namespace.clone(),
                ..ns
            },
            header.block,
        ),
    ] {
        match header.check(&ns, &hash) {
            Ok(()) => {
                assert_eq!(header.namespace, ns.label);
                assert_eq!(header.block, hash);
                assert_eq!(header.payload_len, ns.block_bytes());
            }
            Err(e) => {
                assert!(matches!(e, CodecError::Mismatch { .. }), "{e:?}");
                touch(&e);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let value = Bytes::copy_from_slice(data);

    let header = match codec::decode_header(data) {
        Ok((header, head_len)) => {
            assert!(head_len > PREAMBLE_LEN, "header length {head_len}");
            assert!(head_len <= MAX_HEADER_LEN, "header length {head_len}");
            assert_eq!(head_len % HEADER_ALIGN, 0, "header length {head_len}");
            assert!(head_len <= data.len());
            // The header alone, and a GETRANGE-sized prefix, decode to the same header.
            for prefix in [&data[..head_len], &data[..data.len().min(MAX_HEADER_LEN)]] {
                assert_eq!(
                    codec::decode_header(prefix),
                    Ok((header.clone(), head_len)),
                    "a prefix of a decodable value decodes differently"
                );
            }
            check_header(&header);
            Some((header, head_len))
        }
        Err(e) => {
            touch(&e);
            None
        }
    };

    match codec::decode(value.clone()) {
        Ok(block) => {
            let (h, head_len) = header.expect("decode succeeded but decode_header failed");
            assert_eq!(block.header, h, "decode and decode_header disagree");
            // Payload: exactly payload_len bytes, the tail of the value, checksummed.
            assert_eq!(block.payload.len() as u64, block.header.payload_len);
            assert!(block.header.payload_len <= MAX_PAYLOAD_LEN);
            assert_eq!(head_len + block.payload.len(), data.len());
            assert_eq!(&block.payload[..], &data[head_len..]);
            assert_eq!(block.header.checksum, codec::checksum(&block.payload));
            check_header(&block.header);

            // Round trip: what we would write back must read back identically.
            let again = codec::encode(&block.header, &block.payload);
            match codec::decode(again) {
                Ok(b2) => {
                    assert_eq!(b2.header, block.header, "re-encoded header differs");
                    assert_eq!(b2.payload, block.payload, "re-encoded payload differs");
                }
                Err(e) => {
                    let head = block.header.encode();
                    panic!(
                        "re-encoding a decoded block gives a value that does not decode: {e}\n\
                         input header: {head_len} bytes, re-encoded header: {} bytes, \
                         starting {:?}",
                        head.len(),
                        String::from_utf8_lossy(&head[..head.len().min(96)])
                    )
                }
            }
        }
        Err(e) => {
            touch(&e);
            // decode refuses only what decode_header refuses or the payload checks.
            if header.is_none() {
                assert_eq!(Some(e), codec::decode_header(data).err());
            }
        }
    }
});
