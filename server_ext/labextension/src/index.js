// The Cellblock status page (served by the server extension at <base_url>/cellblock/) as a
// JupyterLab launcher card and command-palette entry, opened in a main-area tab.
import { ICommandPalette, IFrame, MainAreaWidget } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { LabIcon } from '@jupyterlab/ui-components';

const COMMAND = 'cellblock:open-status';

// A stack of three cells. The jp-icon3 class lets JupyterLab's themes recolour it.
const cellblockIcon = new LabIcon({
  name: 'cellblock:status',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="3" width="18" height="5" rx="1"/>
    <rect x="3" y="10" width="18" height="5" rx="1"/>
    <rect x="3" y="17" width="11" height="4" rx="1"/>
  </g>
</svg>`
});

const plugin = {
  id: 'cellblock-launcher:plugin',
  description: 'Opens the Cellblock status page from the launcher and the command palette.',
  autoStart: true,
  optional: [ILauncher, ICommandPalette],
  activate: (app, launcher, palette) => {
    let widget = null;
    app.commands.addCommand(COMMAND, {
      label: 'Cellblock status',
      caption: 'Cellblock workers, your recent submissions and the cached packages',
      icon: cellblockIcon,
      execute: () => {
        // One tab: a second click brings the open one to the front.
        if (widget === null || widget.isDisposed) {
          // IFrame's default sandbox blocks scripts, and the page is a script that fetches
          // status.json with the Jupyter login cookie, so it needs both of these. Together they
          // lift the sandbox, which is fine for a page our own server renders at this origin.
          const content = new IFrame({ sandbox: ['allow-scripts', 'allow-same-origin'] });
          content.url = PageConfig.getBaseUrl() + 'cellblock/';
          widget = new MainAreaWidget({ content });
          widget.id = 'cellblock-status';
          widget.title.label = 'Cellblock';
          widget.title.icon = cellblockIcon;
          widget.title.closable = true;
          app.shell.add(widget, 'main');
        }
        app.shell.activateById(widget.id);
      }
    });
    if (launcher) {
      launcher.add({ command: COMMAND, category: 'Other' });
    }
    if (palette) {
      palette.addItem({ command: COMMAND, category: 'Cellblock' });
    }
  }
};

export default plugin;
