import os

# The tests start and stop PostgreSQL (fork + exec) while gRPC threads run;
# gRPC's fork handlers must stay out of those children. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
