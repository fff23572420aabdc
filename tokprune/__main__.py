from tokprune.cli import main

raise SystemExit(main())
