import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared-data cache for every job in the session (preparation runs once per corpus)."""
    return tmp_path_factory.mktemp("switchyard-cache")
