"""The guide's naming rule and the names we write."""

from __future__ import annotations

from datetime import datetime

import pytest

from purlgate.core.naming import error_name, flag_name, parse_data_name, purl_name
from purlgate.errors import FileNameError, FileTypeError


def test_recommended_form_names_client_and_project() -> None:
    """<client>_<project>_YYYYMMdd_HHMMss_mm.<ext> yields both parts and the time."""
    name = parse_data_name("acme_spring_20261127_101500_00.csv")
    assert (name.client_part, name.project_part) == ("acme", "spring")
    assert name.timestamp == datetime(2026, 11, 27, 10, 15, 0)  # noqa: DTZ001
    assert (name.stem, name.extension) == ("acme_spring_20261127_101500_00", "csv")


@pytest.mark.parametrize(
    "name",
    [
        "export-20261127-101500.csv",
        "data_20261127T101500.TXT",
        "20261127101500.dat",
        "weekly list 20261127 101500.tsv",
    ],
)
def test_any_name_with_an_exact_time_of_day(name: str) -> None:
    """Other names pass when they hold YYYYMMdd and HHMMss; they select no project."""
    parsed = parse_data_name(name)
    assert parsed.timestamp == datetime(2026, 11, 27, 10, 15, 0)  # noqa: DTZ001
    assert parsed.client_part is None


@pytest.mark.parametrize(
    "name",
    ["data.csv", "data_20261127.csv", "data_20261327_101500.csv", "data_20261127_256000.csv",
     "x_120261127_101500.csv"],
)
def test_names_without_a_valid_time_of_day(name: str) -> None:
    """A date alone, an impossible month or hour, or a longer digit run are refused."""
    with pytest.raises(FileNameError) as err:
        parse_data_name(name)
    assert "<client>_<project>_YYYYMMdd_HHMMss_mm.<ext>" in err.value.message


@pytest.mark.parametrize("name", ["report_20261127_101500.xlsx", "data_20261127_101500"])
def test_wrong_extension_lists_the_allowed_types(name: str) -> None:
    """Only .csv .tsv .txt .dat (or a .zip) are data files."""
    with pytest.raises(FileTypeError) as err:
        parse_data_name(name)
    assert "send one of: .csv .tsv .txt .dat .zip .pgp .gpg" in err.value.message


@pytest.mark.parametrize("name", ["../x_20261127_101500.csv", ".hidden_20261127_101500.csv",
                                  "a\nb_20261127_101500.csv", "a\\b_20261127_101500.csv"])
def test_unsafe_names(name: str) -> None:
    """Separators, control characters and hidden names never become output names."""
    with pytest.raises(FileNameError):
        parse_data_name(name)


def test_output_names_follow_the_guide() -> None:
    """<Prefix><ORIGINAL_FILE_NAME><Suffix>.<EXT>, the flag adds .flg."""
    data = parse_data_name("acme_spring_20261127_101500_00.Csv")
    assert purl_name(data, "PURL_", "") == "PURL_acme_spring_20261127_101500_00.Csv"
    assert purl_name(data, "", "_out") == "acme_spring_20261127_101500_00_out.Csv"
    assert purl_name(data, "PURL_", "", encrypted=True) == (
        "PURL_acme_spring_20261127_101500_00.Csv.gpg")
    bare = parse_data_name("data_file_20261127_101500", from_pgp=True)
    assert purl_name(bare, "PURL_", "", encrypted=True) == "PURL_data_file_20261127_101500.gpg"
    assert purl_name(bare, "PURL_", "") == "PURL_data_file_20261127_101500.csv"
    assert flag_name("PURL_a.csv") == "PURL_a.csv.flg"
    assert error_name(data, "PURL_", "") == "PURL_acme_spring_20261127_101500_00_errors.csv"
