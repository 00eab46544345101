"""numbers.py: the numbers a user types, read as typed (int() and float() read more)."""

import argparse

import pytest

from internvl_chat.numbers import OtherDigits, parse_float, parse_int


@pytest.mark.parametrize("text, value", [("12", 12), ("-3", -3), ("+4", 4), (" 64 ", 64), ("007", 7)])
def test_whole_numbers_as_typed_are_read(text, value):
    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["1_0", "0x10", "1.5", "", " ", "1 0", "- 1", "\u00a01", "1e3", "9" * 5000])
def test_text_int_reads_but_a_user_does_not_mean_is_refused(text):
    with pytest.raises(ValueError) as err:
        parse_int(text)
    assert not isinstance(err.value, OtherDigits)
    shown = ascii(text) if len(text) < 30 else "'" + "9" * 38 + "…"  # cut short; int()'s own words were of its digit limit
    assert str(err.value) == f"must be a whole number, not {shown}"


@pytest.mark.parametrize(
    "text, value", [("0.5", 0.5), ("-2", -2.0), (".5", 0.5), ("5.", 5.0), ("1e-3", 0.001), (" 1E2 ", 100.0)]
)
def test_numbers_as_typed_are_read(text, value):
    assert parse_float(text) == value


@pytest.mark.parametrize("text", ["1_0.5", "inf", "-Infinity", "nan", ".", "e3", "0x1p3", "1,5"])
def test_text_float_reads_but_a_user_does_not_mean_is_refused(text):
    with pytest.raises(ValueError, match=r"^must be a number, not "):
        parse_float(text)


@pytest.mark.parametrize("parse", [parse_int, parse_float])
@pytest.mark.parametrize("text, shown", [("١", "'\\u0661'"), ("2２", "'2\\uff12'"), ("𝟏", "'\\U0001d7cf'"), ("1_٠", "'1_\\u0660'")])
def test_other_digits_are_refused_saying_so_with_the_text_escaped(parse, text, shown):
    with pytest.raises(OtherDigits) as err:
        parse(text)
    assert str(err.value) == f"must be written with the digits 0-9, not {shown}"
    assert isinstance(err.value, argparse.ArgumentTypeError)  # argparse shows these words, not "invalid int value"


def test_a_huge_exponent_is_left_to_the_callers_range_check():
    assert parse_float("1e999") == float("inf")
