//! Tenants and their tokens: the [`Caller`] a bearer token stands for (with its tenant's
//! hash salt), and the one authorization check of operator actions.

use std::sync::Arc;

use super::{ApiError, Shelf};
use crate::config::TenantConfig;

/// Who is calling: the tenant their token selects.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    tenant: Option<Arc<Tenant>>,
}

/// A configured tenant, found by its token.
#[derive(Debug)]
pub(super) struct Tenant {
    name: String,
    salt: Option<Vec<u8>>,
    admin: bool,
}

impl Tenant {
    pub(super) fn of(t: &TenantConfig) -> Tenant {
        Tenant {
            name: t.name.clone(),
            salt: t.salt.as_ref().map(|s| s.as_bytes().to_vec()),
            admin: t.admin,
        }
    }
}

impl Caller {
    pub(super) fn salt(&self) -> Option<&[u8]> {
        self.tenant.as_ref().and_then(|t| t.salt.as_deref())
    }

    /// Whether this caller's hashes are salted: then only the sidecar can compute them
    /// (the salt never leaves it), and a client must ask `hash` rather than hash itself.
    pub fn salted(&self) -> bool {
        self.salt().is_some()
    }

    /// The tenant's name, for logs.
    pub fn tenant_name(&self) -> Option<&str> {
        self.tenant.as_ref().map(|t| t.name.as_str())
    }

    fn is_admin(&self) -> bool {
        self.tenant.as_ref().is_some_and(|t| t.admin)
    }
}

impl Shelf {
    /// The caller a bearer token stands for. Without configured tokens everyone is the
    /// anonymous caller (no salt); with tokens, a missing or unknown one is refused.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, ApiError> {
        if self.inner.tenants.is_empty() {
            return Ok(Caller::default());
        }
        let token = bearer.ok_or(ApiError::Unauthenticated)?;
        // Compare against every token, so response time does not depend on which matched.
        let mut found = None;
        for (t, tenant) in &self.inner.tenants {
            if secrets_equal(t.as_bytes(), token.as_bytes()) {
                found = Some(tenant.clone());
            }
        }
        found
            .map(|tenant| Caller {
                tenant: Some(tenant),
            })
            .ok_or(ApiError::Unauthenticated)
    }

    /// The one authorization check of operator actions: without configured tokens every
    /// caller is the one trusted tenant; with tokens, only admins may change blocks they did
    /// not just put. A block hash is easy to learn (an unsalted tenant's can be computed from
    /// its prompt), so it must not be enough to delete, pin or unpin the block. Called
    /// before anything changes, the L1 included.
    pub(super) fn require_admin(&self, caller: &Caller, action: &str) -> Result<(), ApiError> {
        if self.inner.tenants.is_empty() || caller.is_admin() {
            return Ok(());
        }
        tracing::info!(tenant = ?caller.tenant_name(), action, "refused: not an admin token");
        Err(ApiError::Forbidden(format!(
            "{action} needs an admin token (with tokens configured, only admins may delete, \
             pin, unpin or purge)"
        )))
    }
}

/// Whether two secrets are equal, in a time that depends on neither's content nor length.
/// Both are hashed first, so the compared inputs always have the same length and nothing a
/// caller sends lines up byte by byte with a configured token; `subtle` then compares the
/// digests in a way the optimizer cannot turn into an early exit (a hand-written XOR-fold
/// can be).
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(a)[..].ct_eq(&Sha256::digest(b)[..]).into()
}
