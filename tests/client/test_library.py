"""The variable library: the app's file format, subfolders, atomic writes that never clobber."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from client import Library, LibraryError, VariableExistsError
from client._library import write_new_file


def test_reads_md_and_txt_with_descriptions_and_subfolders(library_dir):
    (library_dir / "styles").mkdir(parents=True)
    (library_dir / "animal.txt").write_text("# Animals\n# for forests\nfox\n\n  owl  \n")
    (library_dir / "styles" / "light.md").write_text("golden hour\nblue hour\n")
    library = Library(library_dir)
    animal = library.get("animal")
    assert animal.values == ["fox", "owl"]
    assert animal.description == "Animals\nfor forests"
    assert library.get("__styles/light__").values == ["golden hour", "blue hour"]
    assert library.get("missing") is None
    assert library.names() == ["animal", "styles/light"]


def test_md_wins_over_txt_and_latin1_files_still_read(library_dir):
    library_dir.mkdir()
    (library_dir / "x.txt").write_text("from txt\n")
    (library_dir / "x.md").write_text("from md\n")
    (library_dir / "old.txt").write_bytes("café\n".encode("latin-1"))
    library = Library(library_dir)
    assert library.get("x").values == ["from md"]
    assert library.get("old").values == ["café"]


def test_save_writes_the_apps_format(library_dir):
    library = Library(library_dir)
    variable = library.save("styles/light", ["golden hour", "", "blue hour"], "Light\nfor photos")
    assert variable.path == library_dir / "styles" / "light.md"
    assert variable.path.read_text() == "# Light\n# for photos\ngolden hour\nblue hour\n"
    assert library.get("styles/light").values == ["golden hour", "blue hour"]
    assert not [p for p in variable.path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("existing", ["animal.md", "animal.txt"])
def test_save_never_clobbers_a_users_file(library_dir, existing):
    library_dir.mkdir()
    (library_dir / existing).write_text("# mine\nfox\n")
    with pytest.raises(VariableExistsError, match="left unchanged"):
        Library(library_dir).save("animal", ["owl"])
    assert (library_dir / existing).read_text() == "# mine\nfox\n"
    assert sorted(p.name for p in library_dir.iterdir()) == [existing]


def test_a_file_that_appears_during_the_write_wins(library_dir, monkeypatch):
    target = library_dir / "animal.md"
    real_link = os.link

    def link_after_someone_else(src, dst):
        target.write_text("theirs\n")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_someone_else)
    with pytest.raises(VariableExistsError):
        Library(library_dir).save("animal", ["mine"])
    assert target.read_text() == "theirs\n"
    assert [p.name for p in library_dir.iterdir()] == ["animal.md"]


def test_without_hard_links_it_still_writes_and_still_refuses_to_clobber(library_dir, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = library_dir / "a.md"
    write_new_file(path, "one\n")
    assert path.read_text() == "one\n"
    with pytest.raises(FileExistsError):
        write_new_file(path, "two\n")
    assert path.read_text() == "one\n"


def test_concurrent_saves_leave_exactly_one_whole_file(library_dir):
    library = Library(library_dir)
    outcomes = []

    def save(i):
        try:
            library.save("race", [f"value {i}"] * 200)
            outcomes.append("saved")
        except VariableExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("saved") == 1
    values = library.get("race").values
    assert len(values) == 200 and len(set(values)) == 1


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a//b", "with space", "", "a.b", "_x"])
def test_names_that_cannot_be_files_are_refused(library_dir, name):
    with pytest.raises(LibraryError, match="not a variable name"):
        Library(library_dir).save(name, ["v"])
