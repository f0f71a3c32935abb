//! The flash-sale contract as Rust types: one module per proto package, generated
//! at build time from `proto/`, and the encoded descriptor set that every service
//! hands to gRPC server reflection (and the gateway to gRPC-JSON transcoders).

/// `flashsale.common.v1`: money, items, orders.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("flashsale.common.v1");
    }
}

/// `flashsale.gateway.v1`: the public API.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("flashsale.gateway.v1");
    }
}

/// `flashsale.inventory.v1`: the internal inventory API and the queue payloads.
pub mod inventory {
    pub mod v1 {
        tonic::include_proto!("flashsale.inventory.v1");
    }
}

/// `flashsale.wallet.v1`: the internal wallet API.
pub mod wallet {
    pub mod v1 {
        tonic::include_proto!("flashsale.wallet.v1");
    }
}

/// `google.api`: only `HttpRule`, the type of the `google.api.http` method
/// option with which `gateway.proto` states each RPC's REST route.
pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

/// Encoded `FileDescriptorSet` of every flash-sale proto and everything they
/// import, as protoc wrote it.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flashsale_descriptor");

/// The field number of the `google.api.http` extension of `MethodOptions`.
pub const HTTP_RULE_EXTENSION: u32 = 72_295_728;

/// The encoded `FileDescriptorSet` of `roots` (proto file names such as
/// `flashsale/gateway/v1/gateway.proto`) and of every file they import, out of
/// [`FILE_DESCRIPTOR_SET`]. Each file is copied byte for byte: decoding into
/// `prost_types` would drop the options' extensions (the `google.api.http`
/// rules a transcoder needs). A root that is not one of ours is an error.
pub fn descriptor_set_of(roots: &[&str]) -> Result<Vec<u8>, DescriptorSetError> {
    use prost::Message as _;
    use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

    // `FileDescriptorSet { repeated FileDescriptorProto file = 1; }`, walked on the wire.
    let mut files = Vec::new();
    let mut rest = FILE_DESCRIPTOR_SET;
    while !rest.is_empty() {
        let (tag, wire_type) = decode_key(&mut rest).map_err(|_| DescriptorSetError::Malformed)?;
        if tag != 1 || wire_type != WireType::LengthDelimited {
            return Err(DescriptorSetError::Malformed);
        }
        let len = decode_varint(&mut rest).map_err(|_| DescriptorSetError::Malformed)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > rest.len() {
            return Err(DescriptorSetError::Malformed);
        }
        let (raw, tail) = rest.split_at(len);
        rest = tail;
        let file = prost_types::FileDescriptorProto::decode(raw).map_err(|_| DescriptorSetError::Malformed)?;
        files.push((file, raw));
    }
    let mut wanted: Vec<String> = roots.iter().map(|root| (*root).to_owned()).collect();
    let mut keep = std::collections::BTreeSet::new();
    while let Some(name) = wanted.pop() {
        let Some((file, _)) = files.iter().find(|(file, _)| file.name() == name) else {
            if roots.contains(&name.as_str()) {
                return Err(DescriptorSetError::NoSuchFile(name));
            }
            // protoc includes every import; should one be missing, the
            // reader has it already (a well-known type).
            continue;
        };
        if keep.insert(name) {
            wanted.extend(file.dependency.iter().cloned());
        }
    }
    let mut out = Vec::new();
    for (_, raw) in files.iter().filter(|(file, _)| keep.contains(file.name())) {
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(raw.len() as u64, &mut out);
        out.extend_from_slice(raw);
    }
    Ok(out)
}

/// Why [`descriptor_set_of`] gave no set.
#[derive(Debug)]
pub enum DescriptorSetError {
    /// A root is none of our proto files.
    NoSuchFile(String),
    /// The embedded set does not decode (a build defect).
    Malformed,
}

impl std::fmt::Display for DescriptorSetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchFile(name) => write!(f, "no proto file {name}"),
            Self::Malformed => f.write_str("the embedded descriptor set does not decode"),
        }
    }
}

impl std::error::Error for DescriptorSetError {}
