from cellblock.cli import main

raise SystemExit(main())
