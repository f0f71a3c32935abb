//! The flash-sale contract as Rust types: one module per proto package, generated
//! at build time from `proto/`, and the encoded descriptor set that every service
//! hands to gRPC server reflection.

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

/// Encoded `FileDescriptorSet` of every flash-sale proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flashsale_descriptor");
