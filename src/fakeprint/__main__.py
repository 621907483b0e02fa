from fakeprint.interfaces.cli import main

raise SystemExit(main())
