//! The operator's calls (`AdminService`): creating a sale and topping a
//! wallet up, each written to the audit log whatever its outcome, and a
//! sale's statistics. Every one requires an admin caller.

use flashsale_domain::{ItemId, TopUpKey};
use flashsale_proto::gateway::v1::*;
use flashsale_proto::inventory::v1 as inventory;
use flashsale_proto::wallet::v1 as wallet;

use super::Operations;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::upstream::{request, retry_if_lost};

impl Operations {
    /// Creates a sale (admin), and says so in the audit log whatever the outcome.
    pub async fn create_item(
        &self,
        caller: &Principal,
        req: CreateItemRequest,
    ) -> Result<CreateItemResponse, GatewayError> {
        let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
        let details = serde_json::json!({
            "name": req.name,
            "price": crate::audit::money(req.price.as_ref()),
            "stock_total": req.stock_total,
            "per_user_limit": req.per_user_limit,
            "admission_buckets": req.admission_buckets,
            "starts_at_unix": time(&req.starts_at),
            "ends_at_unix": time(&req.ends_at),
        });
        let target = req.id.clone();
        let result = self.create_item_unaudited(caller, req).await;
        self.audited(caller, "create_item", &target, &result, details);
        result
    }

    /// Records an admin action's outcome in the audit log.
    fn audited<T>(
        &self,
        caller: &Principal,
        action: &str,
        target: &str,
        result: &Result<T, GatewayError>,
        details: serde_json::Value,
    ) {
        let outcome = match result {
            Ok(_) => "OK".to_owned(),
            // Inventory's or the wallet's own reason, not just "from upstream".
            Err(GatewayError::Upstream(status)) => {
                use tonic_types::StatusExt;
                status
                    .get_error_details()
                    .error_info()
                    .map_or_else(|| format!("{:?}", status.code()), |info| info.reason.clone())
            }
            Err(error) => error.reason().to_owned(),
        };
        self.audit.record(&crate::audit::AuditRecord {
            at: crate::audit::now(),
            actor: &caller.user_id,
            admin: caller.admin,
            action,
            target,
            outcome: &outcome,
            details,
        });
    }

    async fn create_item_unaudited(
        &self,
        caller: &Principal,
        req: CreateItemRequest,
    ) -> Result<CreateItemResponse, GatewayError> {
        caller.require_admin()?;
        let CreateItemRequest { id, name, price, stock_total, per_user_limit, starts_at, ends_at, admission_buckets } =
            req;
        let reply = self
            .upstreams
            .inventory
            .clone()
            .create_item(request(inventory::CreateItemRequest {
                id,
                name,
                price,
                stock_total,
                per_user_limit,
                starts_at,
                ends_at,
                admission_buckets,
            }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        if let Some(item) = &reply.item {
            self.catalog.upsert(item);
        }
        Ok(CreateItemResponse { item: reply.item })
    }

    /// Credits a buyer (admin), and says so in the audit log whatever the outcome.
    pub async fn top_up(&self, caller: &Principal, req: TopUpRequest) -> Result<TopUpResponse, GatewayError> {
        let details = serde_json::json!({"amount": crate::audit::money(req.amount.as_ref()), "idempotency_key": req.idempotency_key});
        let target = req.user_id.clone();
        let result = self.top_up_unaudited(caller, req).await;
        self.audited(caller, "top_up", &target, &result, details);
        result
    }

    async fn top_up_unaudited(&self, caller: &Principal, req: TopUpRequest) -> Result<TopUpResponse, GatewayError> {
        caller.require_admin()?;
        let TopUpRequest { user_id, amount, idempotency_key } = req;
        // Top-ups have their own corner of the wallet's key space (`TopUpKey`).
        let idempotency_key = TopUpKey::scoped(&idempotency_key)?.into_string();
        // Under its key, a second attempt cannot credit twice.
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.wallet.clone();
            let credit = wallet::CreditRequest {
                idempotency_key: idempotency_key.clone(),
                user_id: user_id.clone(),
                amount: amount.clone(),
                reference: "top-up".into(),
            };
            async move { client.credit(request(credit)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        Ok(TopUpResponse { balance: reply.transaction.and_then(|t| t.balance_after) })
    }

    pub async fn get_item_stats(
        &self,
        caller: &Principal,
        req: GetItemStatsRequest,
    ) -> Result<GetItemStatsResponse, GatewayError> {
        caller.require_admin()?;
        let GetItemStatsRequest { item_id } = req;
        ItemId::check(&item_id)?;
        let inventory::GetItemStatsResponse {
            item,
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        } = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = inventory::GetItemStatsRequest { item_id: item_id.clone() };
            async move { client.get_item_stats(request(lookup)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        Ok(GetItemStatsResponse {
            item,
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        })
    }
}
