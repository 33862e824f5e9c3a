from specx.bench.cli import main

raise SystemExit(main())
