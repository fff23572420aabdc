"""The package's shape: no module imports (directly or through others) a module that imports it.

The one-way layers between stages are import-linter contracts (pyproject.toml, ``make lint``); this
checks the modules inside a stage too, with import-linter's own graph library."""

import grimp


def test_no_import_cycles():
    graph = grimp.build_graph("tokprune")
    cycles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.find_shortest_chain(importer=imported, imported=module)
        }
    )
    assert cycles == []
