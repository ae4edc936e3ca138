"""protos/: the generated code is current, and the KServe protocol is wire compatible with Triton's."""

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from serving.proto.inference import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate.generate(tmp_path)}
    committed = ROOT / "serving" / "proto"
    checked_in = {
        p.relative_to(committed): p.read_bytes()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(checked_in), "run `python protos/generate.py`"
    stale = [str(name) for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated files {stale}: run `python protos/generate.py`"


TRITON_DESCRIPTORS = """
import base64, sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
for module in (service_pb2, model_config_pb2):
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    print(base64.b64encode(proto.SerializeToString()).decode())
"""


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found = {}

    def walk(messages, prefix: str) -> None:
        for message in messages:
            found[prefix + message.name] = message
            walk(message.nested_type, f"{prefix}{message.name}.")

    walk(file.message_type, "")
    return found


def test_wire_compatible_with_tritons_published_protocol() -> None:
    """Every message, field, enum value and RPC we declare exists in tritonclient's copy of Triton's
    grpc_service.proto / model_config.proto with the same number and type. tritonclient registers the
    same `inference.*` names as we do, so it is read in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-c", TRITON_DESCRIPTORS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    theirs = [
        descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(line)) for line in done.stdout.split()
    ]
    ours = [
        descriptor_pb2.FileDescriptorProto.FromString(m.DESCRIPTOR.serialized_pb)
        for m in (grpc_service_pb2, model_config_pb2)
    ]
    their_messages = {**_messages(theirs[0]), **_messages(theirs[1])}
    for file in ours:
        assert file.package == "inference"
        for name, message in _messages(file).items():
            assert name in their_messages, name
            their_fields = {f.name: (f.number, f.type, f.label) for f in their_messages[name].field}
            for field in message.field:
                assert their_fields.get(field.name) == (field.number, field.type, field.label), (
                    f"{name}.{field.name}"
                )
    their_enums = {e.name: {v.name: v.number for v in e.value} for e in theirs[1].enum_type}
    for enum in ours[1].enum_type:
        assert {v.name: v.number for v in enum.value}.items() <= their_enums[enum.name].items()
    their_rpcs = {
        m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for m in theirs[0].service[0].method
    }
    assert ours[0].service[0].name == theirs[0].service[0].name == "GRPCInferenceService"
    for method in ours[0].service[0].method:
        assert their_rpcs[method.name] == (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        )
