"""Pipeline tests that train through the CLI use the same generated corpus as tests/train."""

import pytest

from tests.train.conftest import write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))
