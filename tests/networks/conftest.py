"""Fixtures of the NetworkService tests."""

import grpc
import pytest
from observatory.v1 import network_pb2_grpc


@pytest.fixture
def network_stub(channel: grpc.aio.Channel) -> network_pb2_grpc.NetworkServiceStub:
    return network_pb2_grpc.NetworkServiceStub(channel)
