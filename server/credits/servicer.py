"""CreditService over gRPC: proto in, service call, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from observatory.v1 import credit_pb2, credit_pb2_grpc

from server.auth import principal
from server.credits.service import CreditService

Context = grpc.aio.ServicerContext[Any, Any]


class CreditServicer(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, service: CreditService) -> None:
        self._service = service

    async def GrantCredits(
        self, request: credit_pb2.GrantCreditsRequest, context: Context
    ) -> credit_pb2.Allocation:
        return await self._service.grant(principal(), request)

    async def GetBalance(
        self, request: credit_pb2.GetBalanceRequest, context: Context
    ) -> credit_pb2.Balance:
        return await self._service.balance(principal(), request)

    async def ReserveCredits(
        self, request: credit_pb2.ReserveCreditsRequest, context: Context
    ) -> credit_pb2.Reservation:
        return await self._service.reserve(principal(), request)

    async def SettleReservation(
        self, request: credit_pb2.SettleReservationRequest, context: Context
    ) -> credit_pb2.Reservation:
        return await self._service.settle(principal(), request)

    async def ReleaseReservation(
        self, request: credit_pb2.ReleaseReservationRequest, context: Context
    ) -> credit_pb2.Reservation:
        return await self._service.release(principal(), request)

    async def ListTransactions(
        self, request: credit_pb2.ListTransactionsRequest, context: Context
    ) -> credit_pb2.ListTransactionsResponse:
        return await self._service.list_transactions(principal(), request)

    async def EstimateCost(
        self, request: credit_pb2.EstimateCostRequest, context: Context
    ) -> credit_pb2.EstimateCostResponse:
        return await self._service.estimate_cost(principal(), request)
