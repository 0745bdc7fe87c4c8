from edgevl.cli import main

raise SystemExit(main())
