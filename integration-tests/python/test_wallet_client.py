"""An independent client: Python stubs from proto/ talk to the real wallet."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2


def test_health_reports_serving(wallet_addr):
    with grpc.insecure_channel(wallet_addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "flashsale.wallet.v1.WalletService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_get_balance_sees_a_credit(stubs, wallet_addr):
    wallet_pb2, wallet_pb2_grpc, common_pb2 = stubs["wallet_pb2"], stubs["wallet_pb2_grpc"], stubs["common_pb2"]
    with grpc.insecure_channel(wallet_addr) as channel:
        wallet = wallet_pb2_grpc.WalletServiceStub(channel)

        empty = wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id="py-user", currency="USD"), timeout=5)
        assert [(m.currency, m.amount_minor) for m in empty.balances] == [("USD", 0)]

        credited = wallet.Credit(
            wallet_pb2.CreditRequest(
                idempotency_key="py-top-up-1",
                user_id="py-user",
                amount=common_pb2.Money(currency="USD", amount_minor=12_345),
                reference="python client",
            ),
            timeout=5,
        )
        assert credited.transaction.kind == wallet_pb2.TRANSACTION_KIND_CREDIT
        assert credited.transaction.balance_after.amount_minor == 12_345

        reply = wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id="py-user"), timeout=5)
        assert [(m.currency, m.amount_minor) for m in reply.balances] == [("USD", 12_345)]


def test_bad_input_carries_a_typed_reason(stubs, wallet_addr):
    wallet_pb2, wallet_pb2_grpc = stubs["wallet_pb2"], stubs["wallet_pb2_grpc"]
    with grpc.insecure_channel(wallet_addr) as channel:
        wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        try:
            wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id="py-user", currency="usd"), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(error)
            infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
            assert len(infos) == 1
            info = error_details_pb2.ErrorInfo()
            infos[0].Unpack(info)
            assert info.reason == "INVALID_ARGUMENT"
            assert info.domain == "flashsale"
        else:
            raise AssertionError("a lower-case currency was accepted")


def test_a_hold_keeps_money_aside_until_it_is_voided(stubs, wallet_addr):
    wallet_pb2, wallet_pb2_grpc, common_pb2 = stubs["wallet_pb2"], stubs["wallet_pb2_grpc"], stubs["common_pb2"]
    usd = lambda minor: common_pb2.Money(currency="USD", amount_minor=minor)  # noqa: E731
    with grpc.insecure_channel(wallet_addr) as channel:
        wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        wallet.Credit(
            wallet_pb2.CreditRequest(idempotency_key="py-hold-top-up", user_id="py-holder", amount=usd(1_000)),
            timeout=5,
        )
        held = wallet.Hold(
            wallet_pb2.HoldRequest(order_id="py-order-1", user_id="py-holder", amount=usd(700), ttl_seconds=600),
            timeout=5,
        )
        assert held.hold.state == wallet_pb2.HOLD_STATE_OPEN

        balance = wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id="py-holder", currency="USD"), timeout=5)
        assert [m.amount_minor for m in balance.balances] == [1_000]
        assert [m.amount_minor for m in balance.held] == [700]

        # Only 300 is available: a second hold of 700 is refused with a typed reason.
        try:
            wallet.Hold(
                wallet_pb2.HoldRequest(order_id="py-order-2", user_id="py-holder", amount=usd(700), ttl_seconds=600),
                timeout=5,
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_details_pb2.ErrorInfo()
            [detail] = [d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
            detail.Unpack(info)
            assert info.reason == "INSUFFICIENT_FUNDS"
        else:
            raise AssertionError("money held twice")

        voided = wallet.Void(wallet_pb2.VoidRequest(order_id="py-order-1", user_id="py-holder", amount=usd(700)), timeout=5)
        assert voided.hold.state == wallet_pb2.HOLD_STATE_VOIDED
        balance = wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id="py-holder", currency="USD"), timeout=5)
        assert [m.amount_minor for m in balance.held] == [0]
