//! The TUN's offloads done in user space, over the virtio-net header's bytes
//! ([`crate::wire::vnet`]): [`segment`] is the send half (partial checksums finished, TSO and
//! USO superframes cut into segments), [`coalesce`] the receive half (GRO for TCP).

pub mod coalesce;
pub mod segment;

#[cfg(test)]
mod tests;
