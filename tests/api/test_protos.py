"""The committed generated code matches protos/, and the protos keep their promises."""

from __future__ import annotations

import pytest

from service.api import protogen
from service.api.gen.loraserve.v1 import adapters_pb2, inference_pb2, usage_pb2


def test_generated_code_is_in_sync_with_the_protos():
    stale = protogen.stale_files()
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_staleness_is_detected(tmp_path):
    gen = tmp_path / "gen"
    protogen.generate(gen)
    assert protogen.stale_files(gen) == []
    target = gen / "loraserve" / "v1" / "inference_pb2.py"
    target.write_text(target.read_text().replace("GenerateRequest", "GenerateRequestX"))
    (gen / "loraserve" / "v1" / "usage_pb2.pyi").unlink()
    assert protogen.stale_files(gen) == ["loraserve/v1/inference_pb2.py", "loraserve/v1/usage_pb2.pyi"]


def test_generated_imports_point_into_the_package():
    for path in protogen.GEN_DIR.rglob("*.py"):
        text = path.read_text()
        assert "\nfrom loraserve" not in text and "\nimport loraserve" not in text, path


def fields(message) -> list[tuple[str, int, int, str]]:
    return [(f.name, f.number, f.type, f.containing_oneof.name if f.containing_oneof else "")
            for f in message.DESCRIPTOR.fields]


def test_stream_request_has_the_same_fields_as_the_unary_one():
    assert fields(inference_pb2.GenerateStreamRequest) == fields(inference_pb2.GenerateRequest)


@pytest.mark.parametrize("module", [inference_pb2, adapters_pb2, usage_pb2])
def test_standard_style_enums_start_unspecified_and_rpcs_have_own_messages(module):
    fd = module.DESCRIPTOR
    assert fd.package == "loraserve.v1"
    for enum in fd.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED") and all(v.name.startswith(zero[: -len("UNSPECIFIED")])
                                                     for v in enum.values), enum.name
    for service in fd.services_by_name.values():
        for m in service.methods:
            assert (m.input_type.name, m.output_type.name) == (f"{m.name}Request", f"{m.name}Response")


def test_sampling_fields_are_optional():
    """Every scalar sampling field tells unset from 0 (the server's default applies); a map (logit_bias) is empty
    when unset."""
    for f in inference_pb2.SamplingParams.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        assert f.has_presence, f"SamplingParams.{f.name} must be proto3 optional"
    assert inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name["logit_bias"].message_type.GetOptions().map_entry
