"""`local:NAME` text sources: what each parser keeps of its format, and how job data lists name them."""

from __future__ import annotations

import pytest

from prunefusion.local_texts import SOURCES, debian_descriptions, local_texts, troff_text
from prunefusion.texts import load_texts

MAN_PAGE = r""".TH LS "1" "September 2022"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
.PP
List information about the \fBFILEs\fR (the current directory by default).
Sort entries alphabetically if none of \fB\-cftuvSUX\fR nor \fB\-\-sort\fR is specified.
.SH AUTHOR
Written by Richard M. Stallman and David MacKenzie.
.SH COPYRIGHT
Copyright \(co 2022 Free Software Foundation, Inc.
"""

STATUS = """Package: adduser
Status: install ok installed
Description: add and remove users and groups
 This package includes the 'adduser' and 'deluser' commands for creating
 and removing users.
 .
 The second paragraph.
Homepage: https://example.org

Package: zlib1g
Description: compression library - runtime
 zlib is a library implementing the deflate compression method.
"""


def test_a_man_page_keeps_its_running_text_without_markup_or_licence_sections():
    text = troff_text(MAN_PAGE)
    assert "List information about the FILEs (the current directory by default)." in text
    assert "Sort entries alphabetically if none of -cftuvSUX nor --sort is specified." in text
    assert "\\f" not in text and ".SH" not in text
    assert "Stallman" not in text and "Free Software Foundation" not in text  # AUTHOR and COPYRIGHT left out


def test_package_descriptions_are_read_from_the_dpkg_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text(STATUS)
    docs = debian_descriptions(status)
    assert docs == sorted(docs) and len(docs) == 2
    assert docs[0].startswith("add and remove users and groups.\n\nThis package includes the 'adduser'")
    assert "\n\nThe second paragraph." in docs[0] and "Homepage" not in docs[0]
    assert debian_descriptions(tmp_path / "missing") == []


def test_job_data_lists_name_local_sources_in_the_model_kinds_unit():
    from prunefusion.models.corpus import sentence_splits, stdlib_corpus

    assert load_texts(["local:stdlib"]) == stdlib_corpus().train  # documents for causal LMs
    assert load_texts(["local:stdlib"], "sentences") == sentence_splits()[0]  # the encoders' default training text
    with pytest.raises(ValueError, match="local:man-pages"):  # an unknown name lists the ones there are
        local_texts("local:nope")
    assert set(SOURCES) >= {"man-pages", "info-manuals", "debian-descriptions", "licenses", "package-readmes",
                            "debian-changelogs"}
