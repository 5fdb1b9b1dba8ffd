"""A protoc plugin that runs grpcio-tools' own generators, so that
`buf generate` makes the same Python stubs as `make protos`
(`python -m grpc_tools.protoc --python_out --grpc_python_out`).

buf runs it with a CodeGeneratorRequest on stdin; its parameter (buf.gen.yaml
`opt`) names the generator: `python` (messages, *_pb2.py) or `grpc_python`
(services, *_pb2_grpc.py). Both come from PyPI's grpcio-tools, in the
project's virtualenv.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

GENERATORS = {"python", "grpc_python"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _as_protoc_parses(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """buf fills in every field's json_name; protoc records it only when the
    .proto sets one. Dropping the defaults makes the embedded descriptors, and
    so the generated files, byte for byte those of `make protos`."""
    for message in messages:
        for field in message.field:
            if field.json_name == _camel(field.name):
                field.ClearField("json_name")
        _as_protoc_parses(message.nested_type)


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    generator = request.parameter or "python"
    if generator not in GENERATORS:
        response.error = f"opt must be one of {sorted(GENERATORS)}, not {generator!r}"
    else:
        with tempfile.TemporaryDirectory() as scratch:
            files = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
            for file in files.file:
                _as_protoc_parses(file.message_type)
            descriptors = Path(scratch) / "descriptors.binpb"
            descriptors.write_bytes(files.SerializeToString())
            out = Path(scratch) / "out"
            out.mkdir()
            done = subprocess.run(  # noqa: S603 (our interpreter, fixed arguments)
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"--descriptor_set_in={descriptors}",
                    f"--{generator}_out={out}",
                    *request.file_to_generate,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                response.error = done.stderr
            else:
                for path in sorted(out.rglob("*")):
                    if path.is_file():
                        response.file.add(
                            name=path.relative_to(out).as_posix(), content=path.read_text()
                        )
    sys.stdout.buffer.write(response.SerializeToString())


if __name__ == "__main__":
    main()
