from chatsse.cli import main

raise SystemExit(main())
