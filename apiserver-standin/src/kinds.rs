//! The kinds the stand-in serves (nodes, services, endpointslices) and what the server needs
//! to know about each: URL segment, scope, whether it has a status subresource.

use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{Table, Tables};

/// One of the served kinds, without its type (for routing and counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KindTag {
    Nodes,
    Services,
    EndpointSlices,
}

impl KindTag {
    /// Every served kind.
    pub const ALL: [Self; 3] = [Self::Nodes, Self::Services, Self::EndpointSlices];

    /// The resource's name in URLs and RBAC (`nodes`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Nodes => "nodes",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
        }
    }

    /// The API group (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Self::Nodes | Self::Services => "",
            Self::EndpointSlices => "discovery.k8s.io",
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Nodes)
    }

    /// Whether the kind has a `/status` subresource (and so a `status` its main endpoint
    /// leaves alone).
    pub fn has_status(self) -> bool {
        !matches!(self, Self::EndpointSlices)
    }

    /// The kind served under `group`/`plural`, if any.
    pub fn from_group_plural(group: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.group() == group && kind.plural() == plural)
    }
}

impl fmt::Display for KindTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

/// A kind the store holds, as its k8s-openapi type.
pub trait StoredKind:
    k8s_openapi::Resource
    + k8s_openapi::ListableResource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The untyped tag of this kind.
    const TAG: KindTag;

    /// This kind's table in the store.
    fn table(tables: &Tables) -> &Table<Self>;

    /// This kind's table in the store, to change.
    fn table_mut(tables: &mut Tables) -> &mut Table<Self>;
}

impl StoredKind for Node {
    const TAG: KindTag = KindTag::Nodes;

    fn table(tables: &Tables) -> &Table<Self> {
        &tables.nodes
    }

    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.nodes
    }
}

impl StoredKind for Service {
    const TAG: KindTag = KindTag::Services;

    fn table(tables: &Tables) -> &Table<Self> {
        &tables.services
    }

    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.services
    }
}

impl StoredKind for EndpointSlice {
    const TAG: KindTag = KindTag::EndpointSlices;

    fn table(tables: &Tables) -> &Table<Self> {
        &tables.endpoint_slices
    }

    fn table_mut(tables: &mut Tables) -> &mut Table<Self> {
        &mut tables.endpoint_slices
    }
}
