from ctseg.cli import main

raise SystemExit(main())
