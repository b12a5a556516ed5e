"""The API names a bad request field by its AUTOMATIC1111 name in a 422, whichever check found it."""

from __future__ import annotations

import pytest

from tests.server.conftest import post
from tests.server.test_api import detail_fields

pytest.importorskip("fastapi")


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"cfg_scale": 1e308}, "cfg_scale", "cfg_scale must be from -1000 to 1000"),  # `bounds`, via Job.validate
        ({"sampler_name": "DDIM", "steps": 600}, "steps", "steps 600: ddim supports at most 500 steps"),  # the sampling plan
        ({"batch_size": 17}, "batch_size", "batch_size must be from 1 to 16"),  # the server's own limit
        ({"refiner_checkpoint": "tiny.safetensors", "refiner_switch_at": 1.5}, "refiner_switch_at", "refiner_switch_at 1.5 must be"),
    ],
)
def test_the_api_names_a_bad_value_by_its_automatic1111_field(server, change, field, words):
    response = post(server, "txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64, **change})
    assert response.status_code == 422 and detail_fields(response) == [field], response.text
    assert words in response.json()["detail"][0]["msg"]
